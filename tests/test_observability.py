"""Metrics and request logs after a known workload, on a server of its own: the counts by outcome
(cancellations included), the per-request histograms, the gauges back at 0 when idle, where the
metrics port listens, and one log line per request that never holds the prompt."""

from __future__ import annotations

import logging
import os
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import textgen
from prometheus_client.parser import text_string_to_metric_families
from server_harness import ServerThread, listening_sockets
from textgen.v1 import textgen_pb2 as pb
from textgen.v1 import textgen_pb2_grpc as rpc
from textgen_server.metrics import Metrics
from textgen_server.scheduler import StepStats

SECRET_PROMPT = "the launch code is swordfish"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics over HTTP: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def harness(tiny_model_dir: Path) -> Iterator[ServerThread]:
    server = ServerThread(tiny_model_dir, metrics_port=0)
    yield server
    server.stop(grace=0)


def _holds_within(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def _wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    assert _holds_within(condition, timeout), "timed out"


def test_metrics_after_a_known_workload(harness: ServerThread, caplog: pytest.LogCaptureFixture) -> None:
    metrics_port = harness.server.metrics_port
    assert metrics_port
    scheduler = harness.server.scheduler
    assert scheduler is not None
    caplog.set_level(logging.DEBUG)
    before = scrape(metrics_port)
    assert value(before, "textgen_request_count_total") == 0
    successes: list[pb.Usage] = []
    with grpc.insecure_channel(harness.target) as channel:
        stub = rpc.TextGenerationStub(channel)
        for i in range(3):
            request = pb.GenerateRequest(prompt=f"{SECRET_PROMPT} {i}", max_tokens=4 + i, temperature=0)
            successes.append(stub.Generate(request).usage)
        for i in range(2):
            chunks = list(stub.GenerateStream(pb.GenerateRequest(prompt=SECRET_PROMPT, max_tokens=3 + i)))
            successes.append(chunks[-1].usage)
        for request in (
            pb.GenerateRequest(prompt=SECRET_PROMPT, top_k=0),  # INVALID_ARGUMENT
            pb.GenerateRequest(prompt=SECRET_PROMPT, lora="ninja"),  # NOT_FOUND
        ):
            with pytest.raises(grpc.RpcError):
                stub.Generate(request)
        # A stream the client cancels mid-way (greedy, it would run to its 3000 tokens: sampled, it
        # could end on EOS first); while it runs, the gauges show it. (The scheduler's step is in the
        # metrics before its decode tokens go out: after the second chunk, at least one step with this
        # request in the batch is.)
        stream = stub.GenerateStream(pb.GenerateRequest(prompt=SECRET_PROMPT, max_tokens=3000, temperature=0))
        for _ in range(3):
            next(stream)
        running = scrape(metrics_port)
        stream.cancel()
        # A call whose deadline passes mid-generation (3000 tiny-model tokens took 0.47 s here, so
        # the deadline comes first on a machine up to twice as fast). On a loaded machine the
        # deadline can pass before the servicer starts: grpc then cancels its task before it runs,
        # and nothing of the server sees the call (a CI run beside other work met that once), so
        # the call is sent again until the server has counted one.
        for _ in range(5):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Generate(
                    pb.GenerateRequest(prompt=SECRET_PROMPT, max_tokens=3000, temperature=0), timeout=0.2
                )
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            if _holds_within(lambda: value(scrape(metrics_port), "textgen_request_count_total") == 9, 10):
                break
    _wait_for(lambda: value(scrape(metrics_port), "textgen_request_count_total") == 9)
    _wait_for(lambda: scheduler.running_count == 0)
    after = scrape(metrics_port)

    assert value(running, "textgen_batch_current_size") == 1
    assert value(running, "textgen_kv_positions") > 0
    # Every call ends counted once: 5 successes, 2 refusals, 2 clients that left.
    assert sum(v for (name, _), v in after.items() if name == "textgen_request_success_total") == 5
    assert value(after, "textgen_request_failure_total", code="INVALID_ARGUMENT") == 1
    assert value(after, "textgen_request_failure_total", code="NOT_FOUND") == 1
    assert value(after, "textgen_request_cancelled_total", code="CANCELLED") == 1
    assert value(after, "textgen_request_cancelled_total", code="DEADLINE_EXCEEDED") == 1
    # The per-request histograms take the successes, with their exact token counts.
    for name in (
        "textgen_request_duration",
        "textgen_request_validation_duration",
        "textgen_request_queue_duration",
        "textgen_request_inference_duration",
        "textgen_request_mean_time_per_token_duration",
        "textgen_request_input_length",
        "textgen_request_generated_tokens",
    ):
        assert value(after, f"{name}_count") == 5, name
    assert value(after, "textgen_request_generated_tokens_sum") == sum(u.completion_tokens for u in successes)
    assert value(after, "textgen_request_input_length_sum") == sum(u.prompt_tokens for u in successes)
    # The cancelled ones generated tokens too: the scheduler's counter has them all.
    assert value(after, "textgen_generated_tokens_total") > sum(u.completion_tokens for u in successes)
    assert value(after, "textgen_batch_forward_duration_count", method="prefill") >= 1
    assert value(after, "textgen_batch_forward_duration_count", method="decode") >= 1
    # What is served, as GetModelInfo says it, and the capacity the KV positions are held against.
    with grpc.insecure_channel(harness.target) as channel:
        info = rpc.TextGenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest())
    labels = {
        "model": info.model,
        "dtype": info.dtype,
        "weight_dtype": info.weight_dtype,
        "execution_provider": info.execution_provider,
        "version": textgen.__version__,
    }
    assert value(after, "textgen_model_info", **labels) == 1
    assert value(after, "textgen_kv_capacity_positions") == info.kv_slots * scheduler.engine.max_len > 0
    # Idle again: nothing queued, nothing in the batch, no KV positions held.
    assert value(after, "textgen_queue_size") == 0
    assert value(after, "textgen_batch_current_size") == 0
    assert value(after, "textgen_kv_positions") == 0

    # One log line per call, ids and numbers only: the prompt is nowhere in the logs.
    lines = [r.getMessage() for r in caplog.records if r.name == "textgen_server.requests"]
    assert len(lines) == 9
    assert sum("status=OK" in line for line in lines) == 5
    assert sum("status=CANCELLED" in line for line in lines) == 1
    assert sum("status=DEADLINE_EXCEEDED" in line for line in lines) == 1
    ok = next(line for line in lines if "method=GenerateStream status=OK" in line)
    for key in ("id=", "adapter=-", "prompt_tokens=", "completion_tokens=3", "duration_ms=", "ttft_ms="):
        assert key in ok, ok
    # The stream the client cancelled had started: its line says how long it queued.
    cancelled = next(line for line in lines if "method=GenerateStream status=CANCELLED" in line)
    assert "queue_ms=" in cancelled and "queue_ms=-" not in cancelled, cancelled
    assert not [r for r in caplog.records if "swordfish" in r.getMessage()]


def test_the_metrics_port_listens_where_the_grpc_port_does(harness: ServerThread) -> None:
    listening = listening_sockets(os.getpid())
    assert ("127.0.0.1", harness.port) in listening
    assert ("127.0.0.1", harness.server.metrics_port) in listening
    assert not {port for address, port in listening if address != "127.0.0.1"} & {
        harness.port,
        harness.server.metrics_port,
    }


def test_metrics_host_can_be_set_apart(tiny_model_dir: Path) -> None:
    server = ServerThread(tiny_model_dir, load=False, metrics_port=0, metrics_host="127.0.0.2")
    try:
        assert ("127.0.0.2", server.server.metrics_port) in listening_sockets(os.getpid())
    finally:
        server.stop(grace=0)


def test_prefilled_and_prefix_cached_prompt_tokens_are_counted_apart() -> None:
    metrics = Metrics()
    metrics.observe_step(StepStats(prefill_positions=7, reused_positions=120, batch_size=1))
    metrics.observe_step(StepStats(prefill_positions=3, batch_size=2))
    metrics.observe_step(StepStats(tokens=2, batch_size=2))
    sample = metrics.registry.get_sample_value
    assert sample("textgen_prefill_tokens_total") == 10
    assert sample("textgen_prefix_cache_tokens_total") == 120


def test_failed_forward_passes_are_counted_by_method_and_cause() -> None:
    metrics = Metrics()
    metrics.observe_step(StepStats(failed_passes=[("decode", "out_of_memory"), ("decode_alone", "error")]))
    metrics.observe_step(StepStats(failed_passes=[("decode", "out_of_memory")]))
    sample = metrics.registry.get_sample_value
    failures = "textgen_batch_forward_failures_total"
    assert sample(failures, {"method": "decode", "cause": "out_of_memory"}) == 2
    assert sample(failures, {"method": "decode_alone", "cause": "error"}) == 1
    assert sample(failures, {"method": "prefill", "cause": "error"}) is None


def test_idle_metrics_connections_are_closed_and_their_number_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every connection to the metrics port held a thread until the client sent a request: idle
    connections piled up threads without end."""
    from textgen_server import metrics

    monkeypatch.setattr(metrics._Handler, "timeout", 3.0)
    monkeypatch.setattr(metrics, "MAX_METRICS_CONNECTIONS", 4)
    served = Metrics()
    port = served.serve("127.0.0.1", 0)
    try:
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(4)]
        extra = socket.create_connection(("127.0.0.1", port), timeout=10)
        extra.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        assert extra.recv(1) == b"", "a connection past the bound was served"
        started = time.monotonic()
        assert [connection.recv(1) for connection in idle] == [b""] * 4  # closed by the server
        assert time.monotonic() - started < 9
        assert "textgen_queue_size" in {name for name, _ in scrape(port)}  # their places are free
        for connection in (*idle, extra):
            connection.close()
    finally:
        served.stop()
