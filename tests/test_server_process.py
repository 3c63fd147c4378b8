"""`textgen-server` as a user runs it: a real process, its port, its health, and SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_harness import SERVER, ServerProcess, listening_sockets
from textgen.v1 import textgen_pb2 as pb
from textgen.v1 import textgen_pb2_grpc as rpc


@pytest.fixture
def server_process(tiny_model_dir: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess("--model-dir", str(tiny_model_dir), "--port", "0", "--grace", "20")
    proc.wait_ready()
    yield proc
    if proc.process.poll() is None:
        proc.process.kill()
        proc.process.wait()


def test_sigterm_drains_in_flight_requests(server_process: ServerProcess) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server_process.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        stream = rpc.TextGenerationStub(channel).GenerateStream(
            pb.GenerateRequest(prompt="Drain me", max_tokens=200, temperature=0)
        )
        first = next(stream)
        server_process.process.send_signal(signal.SIGTERM)
        rest = list(stream)  # the request in flight finishes within the grace period
    messages = [first, *rest]
    assert messages[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
    assert len(messages) == messages[-1].usage.completion_tokens
    assert server_process.process.wait(timeout=30) == 0
    assert any("shutting down" in line for line in server_process.lines)


def test_a_second_stop_signal_ends_the_drain_at_once(tiny_model_dir: Path) -> None:
    # One sequence at a time and six long ones queued: seconds of drain, which a 60 s grace allows.
    server = ServerProcess(
        "--model-dir", str(tiny_model_dir), "--port", "0", "--grace", "60", "--max-batch-size", "1"
    )  # fmt: skip
    try:
        server.wait_ready()
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel, ThreadPoolExecutor(6) as pool:
            stub = rpc.TextGenerationStub(channel)

            def outcome(index: int) -> grpc.StatusCode:
                request = pb.GenerateRequest(prompt=f"Keep going {index}", max_tokens=3500, temperature=0)
                try:
                    for _ in stub.GenerateStream(request, timeout=60):
                        pass
                except grpc.RpcError as error:
                    assert error.code() != grpc.StatusCode.UNAVAILABLE or "shut down" in (
                        error.details() or ""
                    )
                    return error.code()
                return grpc.StatusCode.OK

            outcomes = [pool.submit(outcome, index) for index in range(6)]
            time.sleep(0.5)  # all six sent
            server.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while not any("shutting down" in line for line in server.lines):
                assert time.monotonic() < deadline, server.lines
                time.sleep(0.02)
            server.process.send_signal(signal.SIGINT)
            assert server.process.wait(timeout=15) == 0
            codes = [future.result(timeout=30) for future in outcomes]
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
        assert grpc.StatusCode.UNAVAILABLE in codes  # the drain did not run its course
        assert any("second stop signal" in line for line in server.lines)
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def test_sighup_without_anything_to_reload_is_logged_not_fatal(server_process: ServerProcess) -> None:
    # Operators send SIGHUP to every replica after a rotation; its default action kills the process.
    with grpc.insecure_channel(f"127.0.0.1:{server_process.port}") as channel:
        stream = rpc.TextGenerationStub(channel).GenerateStream(
            pb.GenerateRequest(prompt="Keep going", max_tokens=100, temperature=0)
        )
        first = next(stream)
        server_process.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not any("nothing to reload" in line for line in server_process.lines):
            assert time.monotonic() < deadline, server_process.lines
            time.sleep(0.02)
        messages = [first, *stream]
    assert server_process.process.poll() is None
    assert len(messages) == messages[-1].usage.completion_tokens


def test_new_requests_are_refused_while_draining(server_process: ServerProcess) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server_process.port}") as channel:
        stub = rpc.TextGenerationStub(channel)
        stream = stub.GenerateStream(pb.GenerateRequest(prompt="Keep going", max_tokens=3000, temperature=0))
        next(stream)
        server_process.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        code = None
        while time.monotonic() < deadline:
            try:
                stub.Generate(pb.GenerateRequest(prompt="late", max_tokens=1), timeout=5)
            except grpc.RpcError as error:
                code = error.code()
                break
            time.sleep(0.05)
        stream.cancel()
    assert code == grpc.StatusCode.UNAVAILABLE


def test_bad_model_dir_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(SERVER), "--model-dir", str(tmp_path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert "not a model directory (no textgen.json)" in result.stderr.strip().splitlines()[-1]


def test_help_shows_the_defaults() -> None:
    result = subprocess.run([str(SERVER), "--help"], capture_output=True, text=True, timeout=60, check=True)
    text = " ".join(result.stdout.split())  # argparse wraps lines
    for default in ("(default: 127.0.0.1)", "(default: 50051)", "(default: 32)", "(default: 30.0)"):
        assert default in text, default
    assert "(default: None)" not in text and "(default: False)" not in text


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


@pytest.mark.parametrize("which", ["--port", "--metrics-port"])
def test_a_port_in_use_is_one_line_naming_it(tiny_model_dir: Path, busy_port: int, which: str) -> None:
    ports = {"--port": "0", "--metrics-port": "0", which: str(busy_port)}
    args = [arg for option, port in ports.items() for arg in (option, port)]
    result = subprocess.run(
        [str(SERVER), "--model-dir", str(tiny_model_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert f"127.0.0.1:{busy_port}" in last and "Address already in use" in last, result.stderr
    assert ("metrics" in last) == (which == "--metrics-port")


def test_nothing_listens_on_all_interfaces_unless_asked(tiny_model_dir: Path) -> None:
    proc = ServerProcess("--model-dir", str(tiny_model_dir), "--port", "0", "--metrics-port", "0")
    try:
        proc.wait_ready()
        assert proc.metrics_port, "".join(proc.lines)  # the log says where the metrics are
        listening = listening_sockets(proc.process.pid)
    finally:
        proc.stop()
    assert {port for _, port in listening} >= {proc.port, proc.metrics_port}
    assert {address for address, _ in listening} == {"127.0.0.1"}, listening
