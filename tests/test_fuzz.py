"""Fuzz a live in-process server with schema-drawn, just-invalid and corrupt requests (issue 14).

Each case goes out as raw bytes through a generic channel call and its status is judged by the
oracle in fuzz_cases.py; INTERNAL and UNKNOWN always fail. Meanwhile a canary stream runs over and
over beside the fuzz: a case that fails its batch-mates fails the canary. At the end no slot may be
held and the gauges must read zero.

`make test` sends a few hundred requests (TEXTGEN_FUZZ_EXAMPLES=300 by default); `make stress`
sends 12,000 and writes the tally by status code to $TEXTGEN_FUZZ_REPORT.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from fuzz_cases import (
    Bound,
    Case,
    Limits,
    Tally,
    check,
    huge_array_cases,
    huge_string_cases,
    just_invalid_cases,
    mangled_cases,
    model_info_cases,
    nesting_cases,
    schema_bounds,
    send,
    string_fields,
    utf8_cases,
    valid_cases,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from server_harness import ServerThread
from textgen.v1 import textgen_pb2 as pb
from textgen.v1 import textgen_pb2_grpc as rpc

EXAMPLES = int(os.environ.get("TEXTGEN_FUZZ_EXAMPLES", "300"))
REPORT = os.environ.get("TEXTGEN_FUZZ_REPORT")
# Shares of the example budget.
SHARES = {
    "valid": 0.30,
    "just_invalid": 0.20,
    "huge": 0.08,
    "utf8": 0.15,
    "mangled": 0.12,
    "nesting": 0.07,
    "model_info": 0.08,
}


def _settings(share: str, parts: int) -> settings:
    """The share's examples, divided among `parts` parametrized tests (at least 3 each)."""
    return settings(
        max_examples=max(3, int(EXAMPLES * SHARES[share] / parts)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


class Canary:
    """A greedy stream run again and again beside the fuzz; any failure of it is a failure of isolation."""

    REQUEST = pb.GenerateRequest(prompt="The canary sings", max_tokens=24, temperature=0)

    def __init__(self, target: str) -> None:
        self._channel = grpc.insecure_channel(target)
        self._stub = rpc.TextGenerationStub(self._channel)
        self.reference = self._stub.Generate(self.REQUEST, timeout=60)
        self.runs = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="canary", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                chunks = list(self._stub.GenerateStream(self.REQUEST, timeout=60))
                last = chunks[-1]
                if last.usage.prompt_tokens != self.reference.usage.prompt_tokens or len(chunks) != (
                    last.usage.completion_tokens
                ):
                    self.errors.append(f"inconsistent stream: {len(chunks)} messages, usage {last.usage}")
                elif last.finish_reason == pb.FINISH_REASON_UNSPECIFIED:
                    self.errors.append("stream ended without a finish reason")
            except grpc.RpcError as error:
                self.errors.append(f"{error.code().name}: {error.details()}")
            self.runs += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self._channel.close()


class Fuzzer:
    def __init__(self, server: ServerThread) -> None:
        self.server = server
        self.channel = grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", -1)])
        info = rpc.TextGenerationStub(self.channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        self.limits = Limits(
            info.max_input_length, info.max_total_tokens, server.server.settings.max_message_bytes
        )
        self.tally = Tally()
        self.canary = Canary(server.target)
        self.recent: list[Case] = []

    def run(self, case: Case) -> None:
        outcome = send(self.channel, case)
        self.tally.add(case.kind, outcome.code)
        self.recent = [*self.recent[-4:], case]
        check(case, outcome, self.limits)
        assert not self.canary.errors, f"the canary failed beside {self.recent}: {self.canary.errors}"

    def close(self) -> None:
        self.canary.stop()
        self.channel.close()


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir: Path) -> Iterator[ServerThread]:
    harness = ServerThread(tiny_model_dir)
    yield harness
    harness.stop(grace=1)


@pytest.fixture(scope="module")
def fuzzer(fuzz_server: ServerThread) -> Iterator[Fuzzer]:
    fuzzer = Fuzzer(fuzz_server)
    yield fuzzer
    fuzzer.close()
    if REPORT:
        Path(REPORT).parent.mkdir(parents=True, exist_ok=True)
        report = {**fuzzer.tally.as_json(), "canary_runs": fuzzer.canary.runs, "examples_setting": EXAMPLES}
        Path(REPORT).write_text(json.dumps(report, indent=2) + "\n")


def _fuzz(fuzzer: Fuzzer, strategy: st.SearchStrategy[Case], share: str, parts: int = 1) -> None:
    runs_before = fuzzer.canary.runs

    @_settings(share, parts)
    @given(strategy)
    def run(case: Case) -> None:
        fuzzer.run(case)

    run()
    _wait_for(lambda: fuzzer.canary.runs > runs_before)
    assert fuzzer.canary.runs > runs_before, "the canary never completed a run during this test"


def test_the_generators_cover_the_schema() -> None:
    # Every bound of the card's schema (both branches) and every string field of the proto.
    bounds = {(b.branch, b.path, b.keyword) for b in BOUNDS}
    assert (0, ("prompt",), "maxLength") in bounds and (
        1,
        ("messages", "*", "content"),
        "maxLength",
    ) in bounds
    assert len(bounds) == 2 * 7 * 2 + 2 + 1 + 2 * 3, sorted(
        bounds
    )  # 7 sampling ranges, prompt, content, stop
    assert len(STRING_FIELDS) >= 16  # read from the proto: every string field, nested ones included


BOUNDS = schema_bounds()
STRING_FIELDS = sorted(string_fields())


def test_valid_bodies(fuzzer: Fuzzer) -> None:
    _fuzz(fuzzer, valid_cases(fuzzer.limits), "valid")


def _bound_id(bound: Bound) -> str:
    return f"{('prompt', 'chat')[bound.branch]}-{'.'.join(bound.path)}-{bound.keyword}"


@pytest.mark.parametrize("bound", BOUNDS, ids=_bound_id)
def test_just_invalid_bodies(fuzzer: Fuzzer, bound: Bound) -> None:
    _fuzz(fuzzer, just_invalid_cases(fuzzer.limits, bound), "just_invalid", len(BOUNDS))


@pytest.mark.parametrize("path", STRING_FIELDS)
def test_huge_strings(fuzzer: Fuzzer, path: str) -> None:
    _fuzz(fuzzer, huge_string_cases(fuzzer.limits, path), "huge", len(STRING_FIELDS) + 1)


def test_huge_arrays(fuzzer: Fuzzer) -> None:
    _fuzz(fuzzer, huge_array_cases(fuzzer.limits), "huge", len(STRING_FIELDS) + 1)


@pytest.mark.parametrize("path", STRING_FIELDS)
def test_invalid_utf8(fuzzer: Fuzzer, path: str) -> None:
    _fuzz(fuzzer, utf8_cases(path), "utf8", len(STRING_FIELDS))


def test_truncated_and_bit_flipped(fuzzer: Fuzzer) -> None:
    _fuzz(fuzzer, mangled_cases(fuzzer.limits), "mangled")


def test_deep_nesting(fuzzer: Fuzzer) -> None:
    _fuzz(fuzzer, nesting_cases(fuzzer.limits), "nesting")


def test_model_info_bytes(fuzzer: Fuzzer) -> None:
    _fuzz(fuzzer, model_info_cases(), "model_info")


def test_no_slot_is_left_behind(fuzzer: Fuzzer, fuzz_server: ServerThread) -> None:
    """After the fuzz (and its cancels and deadlines) nothing runs, nothing waits, the gauges say so."""
    fuzzer.canary.stop()
    scheduler = fuzz_server.server.scheduler
    assert scheduler is not None

    def settled() -> bool:
        return scheduler.running_count == 0 and scheduler.queued_count == 0

    _wait_for(settled)
    assert (scheduler.running_count, scheduler.queued_count, scheduler.kv_positions) == (0, 0, 0)
    metrics = generate_latest(fuzz_server.server.metrics.registry).decode()
    gauges = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith(("textgen_queue_size ", "textgen_batch_current_size ", "textgen_kv_positions "))
    }
    expected = {"textgen_queue_size": 0, "textgen_batch_current_size": 0, "textgen_kv_positions": 0}
    assert gauges == expected, gauges
    assert sum(fuzzer.tally.by_code().values()) >= EXAMPLES * 0.9


def _wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
