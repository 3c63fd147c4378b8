"""Many replicas behind one SDK client: three `textgen-server` processes, 200 requests at 16
concurrent, and one replica killed (SIGKILL) mid-run while it is generating. Every request that
had not yielded text (all unary calls, streams not started) succeeds on another replica; every
stream cut after yielding text ends with a clear UNAVAILABLE, never replayed."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_harness import ServerProcess
from textgen import APIStatusError, Client, Completion, Stream

REQUESTS = 200
CONCURRENCY = 16


@dataclass
class Outcome:
    kind: str  # "unary" or "stream"
    chunks: int = 0  # chunks the caller received
    ok: bool = False
    code: grpc.StatusCode | None = None
    message: str = ""


@pytest.fixture
def replicas(tiny_model_dir: Path) -> Iterator[list[ServerProcess]]:
    servers = [
        ServerProcess("--model-dir", str(tiny_model_dir), "--port", "0", "--metrics-port", "0")
        for _ in range(3)
    ]
    try:
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


def _batch_size(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "textgen_batch_current_size":
            return family.samples[0].value
    raise AssertionError("no textgen_batch_current_size")


def test_a_replica_killed_mid_run(replicas: list[ServerProcess]) -> None:
    victim = replicas[0]
    client = Client([f"127.0.0.1:{server.port}" for server in replicas], timeout=30, max_retries=3)
    done = threading.Semaphore(0)

    def run(i: int) -> Outcome:
        # One request in four is unary; the others stream long enough to be cut mid-way.
        outcome = Outcome("unary" if i % 4 == 0 else "stream")
        try:
            if outcome.kind == "unary":
                result = client.generate(f"Request {i}", max_tokens=16, temperature=0)
                assert isinstance(result, Completion)
                outcome.ok = result.usage.completion_tokens > 0 and result.finish_reason is not None
            else:
                stream = client.generate(f"Request {i}", max_tokens=48, temperature=0, stream=True)
                assert isinstance(stream, Stream)
                with stream:
                    for chunk in stream:
                        outcome.chunks += 1
                        if chunk.finish_reason is not None:
                            assert chunk.usage is not None
                            outcome.ok = outcome.chunks == chunk.usage.completion_tokens
        except APIStatusError as exc:
            outcome.code, outcome.message = exc.code, exc.message
        finally:
            done.release()
        return outcome

    with client, ThreadPoolExecutor(CONCURRENCY) as pool:
        futures = [pool.submit(run, i) for i in range(REQUESTS)]
        for _ in range(REQUESTS // 5):  # let the run get going
            done.acquire()
        deadline = time.monotonic() + 15
        while _batch_size(victim.metrics_port) < 4:  # kill it while it is generating for several
            assert time.monotonic() < deadline, "the victim never had 4 requests running at once"
        victim.process.kill()
        outcomes = [future.result() for future in futures]

    not_started = [o for o in outcomes if o.chunks == 0]
    cut = [o for o in outcomes if not o.ok and o.chunks > 0]
    assert all(o.ok for o in not_started), [(o.kind, o.code, o.message) for o in not_started if not o.ok]
    assert sum(o.kind == "unary" for o in not_started) == REQUESTS // 4
    assert cut, "no stream was cut: the kill missed the streams in flight"
    for outcome in cut:
        assert outcome.code == grpc.StatusCode.UNAVAILABLE, (outcome.code, outcome.message)
        assert "never retried" in outcome.message
    assert len([o for o in outcomes if o.ok]) + len(cut) == REQUESTS
    # round_robin: every replica served some of them (the victim's lines are those it finished).
    for server in replicas:
        assert any("request id=" in line for line in server.lines)
