"""`textgen-server` as a user runs it: a real process, its port, its health, and SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from textgen.v1 import textgen_pb2 as pb
from textgen.v1 import textgen_pb2_grpc as rpc

SERVER = Path(sys.executable).parent / "textgen-server"


class ServerProcess:
    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen([str(SERVER), *args], stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.port = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if match := re.search(r"listening on [\d.]+:(\d+)", line):
                self.port = int(match.group(1))
            if "ready on" in line or "cannot" in line:
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float = 60) -> None:
        assert self._ready.wait(timeout), "server did not start"
        assert self.port, "".join(self.lines)


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
