"""Faults from outside: a client killed mid-stream, a full queue, a broken model directory (issue 14)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import raw_http2
from server_harness import ServerThread
from textgen.v1 import textgen_pb2 as pb
from textgen.v1 import textgen_pb2_grpc as rpc
from textgen_server.scheduler import SchedulerLimits

SERVER = Path(sys.executable).parent / "textgen-server"


def _wait_for(condition: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


@pytest.fixture(scope="module")
def own_server(tiny_model_dir: Path) -> Iterator[ServerThread]:
    """A server of its own: slot counts here are this module's alone."""
    harness = ServerThread(tiny_model_dir)
    yield harness
    harness.stop(grace=1)


CLIENT = textwrap.dedent(
    """
    import sys
    import grpc
    from textgen.v1 import textgen_pb2 as pb, textgen_pb2_grpc as rpc

    channel = grpc.insecure_channel(sys.argv[1])
    request = pb.GenerateRequest(prompt="Keep talking", max_tokens=3500, temperature=0)
    for index, _ in enumerate(rpc.TextGenerationStub(channel).GenerateStream(request)):
        if index == 2:
            print("streaming", flush=True)
    """
)


def test_client_killed_mid_stream_frees_its_slot(own_server: ServerThread) -> None:
    scheduler = own_server.server.scheduler
    assert scheduler is not None
    with grpc.insecure_channel(own_server.target) as channel:
        stub = rpc.TextGenerationStub(channel)
        client = subprocess.Popen(
            [sys.executable, "-c", CLIENT, own_server.target], stdout=subprocess.PIPE, text=True
        )
        try:
            assert client.stdout is not None and client.stdout.readline().strip() == "streaming"
            bystander = stub.GenerateStream(
                pb.GenerateRequest(prompt="I stay", max_tokens=300, temperature=0)
            )
            first = next(bystander)
            assert scheduler.running_count == 2
            steps_at_kill = scheduler.stats.steps
            client.send_signal(signal.SIGKILL)  # its socket closes with no goodbye
        finally:
            client.wait(timeout=30)
        assert _wait_for(lambda: scheduler.running_count <= 1), "the killed client's request still runs"
        # Far short of its 3500 tokens: the server noticed the closed socket, not the end of the work.
        assert scheduler.stats.steps - steps_at_kill < 1000
        chunks = [first, *bystander]
        assert chunks[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
        assert len(chunks) == chunks[-1].usage.completion_tokens
        assert _wait_for(
            lambda: (scheduler.running_count, scheduler.queued_count, scheduler.kv_positions) == (0, 0, 0)
        )
        assert stub.Generate(pb.GenerateRequest(prompt="Next", max_tokens=3)).usage.completion_tokens == 3


def test_full_queue_refuses_the_next_and_serves_the_rest(tiny_model_dir: Path) -> None:
    harness = ServerThread(tiny_model_dir, limits=SchedulerLimits(max_concurrent_requests=2))
    try:
        with grpc.insecure_channel(harness.target) as channel:
            stub = rpc.TextGenerationStub(channel)
            streams = [
                stub.GenerateStream(pb.GenerateRequest(prompt=f"Stream {i}", max_tokens=200, temperature=0))
                for i in range(2)
            ]
            firsts = [next(stream) for stream in streams]  # both admitted and generating
            with pytest.raises(grpc.RpcError) as caught:
                stub.Generate(pb.GenerateRequest(prompt="One too many", max_tokens=2), timeout=30)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_concurrent_requests=2" in (caught.value.details() or "")
            for first, stream in zip(firsts, streams, strict=True):
                chunks = [first, *stream]
                assert chunks[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
                assert len(chunks) == chunks[-1].usage.completion_tokens
            # The refused request held nothing: once the two are done, the next one is served.
            assert stub.Generate(pb.GenerateRequest(prompt="Now", max_tokens=2)).usage.completion_tokens == 2
        rejected = harness.server.metrics.request_failure.labels("RESOURCE_EXHAUSTED")._value.get()
        assert rejected == 1
    finally:
        harness.stop(grace=0)


def test_clients_that_left_the_queue_free_their_places(tiny_model_dir: Path) -> None:
    """Queued requests whose deadline passed must not hold places under max_concurrent_requests."""
    limits = SchedulerLimits(max_batch_size=1, max_concurrent_requests=4)
    harness = ServerThread(tiny_model_dir, limits=limits)
    try:
        scheduler = harness.server.scheduler
        assert scheduler is not None
        with grpc.insecure_channel(harness.target) as channel:
            stub = rpc.TextGenerationStub(channel)
            busy = stub.GenerateStream(pb.GenerateRequest(prompt="Busy", max_tokens=3500, temperature=0))
            next(busy)  # the one slot is taken: what comes next waits in the queue
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as caught:
                    stub.Generate(pb.GenerateRequest(prompt="Impatient", max_tokens=2), timeout=0.05)
                assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # Within a step or two, while the busy request still holds the slot (so no admission
            # could have emptied the queue):
            assert _wait_for(lambda: scheduler.queued_count == 0, timeout=1), (
                "the queue holds clients that left"
            )
            assert scheduler.running_count == 1
            waiting = stub.GenerateStream(pb.GenerateRequest(prompt="Patient", max_tokens=2))
            busy.cancel()
            chunks = list(waiting)  # admitted, not refused with RESOURCE_EXHAUSTED
            assert chunks[-1].usage.completion_tokens == 2
    finally:
        harness.stop(grace=0)


def test_streams_a_client_never_reads_keep_their_places(tiny_model_dir: Path) -> None:
    """A request counts under max_concurrent_requests until its output is read: a client that never
    read its streams had the server generate each to the end, hold the output, and take more."""
    harness = ServerThread(tiny_model_dir, limits=SchedulerLimits(max_concurrent_requests=3))
    try:
        generated = harness.server.metrics.generated_tokens
        request = pb.GenerateRequest(prompt="Unread", max_tokens=20, temperature=0).SerializeToString()
        unread = raw_http2.UnreadStreams(
            harness.port, "/textgen.v1.TextGeneration/GenerateStream", request, 3
        )
        assert _wait_for(lambda: generated._value.get() == 3 * 20)  # all three generated to the end
        with grpc.insecure_channel(harness.target) as channel:
            stub = rpc.TextGenerationStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.Generate(pb.GenerateRequest(prompt="Next", max_tokens=2), timeout=30)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "3 requests are open (running, queued, or still sending their output)" in (
                caught.value.details() or ""
            )
            unread.close()  # the client left: its places free

            def served() -> bool:
                try:
                    return (
                        stub.Generate(pb.GenerateRequest(prompt="Now", max_tokens=2), timeout=30) is not None
                    )
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    return False

            assert _wait_for(served)
    finally:
        harness.stop(grace=0)


def _advertised_settings(port: int) -> dict[int, int]:
    """The HTTP/2 SETTINGS the server sends a new connection first, by identifier."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        # The client preface, then an empty SETTINGS frame.
        connection.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
        stream = connection.makefile("rb")
        header = stream.read(9)  # length (3 bytes), type, flags, stream id
        assert header[3] == 4, "the server's first frame is not SETTINGS"
        payload = stream.read(int.from_bytes(header[:3], "big"))
    return {
        int.from_bytes(payload[i : i + 2], "big"): int.from_bytes(payload[i + 2 : i + 6], "big")
        for i in range(0, len(payload), 6)
    }


def test_a_connection_holds_a_bounded_number_of_streams(tiny_model_dir: Path) -> None:
    """Streams whose request never comes start no handler: nothing counted them, and one client
    held hundreds of thousands (17 KB each)."""
    harness = ServerThread(tiny_model_dir, load=False, limits=SchedulerLimits(max_concurrent_requests=5))
    try:
        max_concurrent_streams = 3
        assert _advertised_settings(harness.port).get(max_concurrent_streams) == 5 + 32
    finally:
        harness.stop(grace=0)


# -- a broken model directory at start: one line saying what is wrong, a non-zero exit -----------------


def _break(model_dir: Path, tmp: Path, how: str) -> tuple[Path, str]:
    """A copy of `model_dir` broken `how`; returns it and a fragment the error line must contain."""
    broken = tmp / how
    if how == "missing":
        return broken, "not a model directory"
    broken.mkdir()
    if how == "empty":
        return broken, "not a model directory"
    for item in model_dir.iterdir():
        if item.is_file():
            (broken / item.name).write_bytes(item.read_bytes())
    if how == "no-graph":
        (broken / "model.onnx").unlink()
        return broken, "model.onnx missing"
    if how == "truncated-graph":
        data = (broken / "model.onnx").read_bytes()
        (broken / "model.onnx").write_bytes(data[: len(data) // 3])
        return broken, "model.onnx"
    if how == "config-not-json":
        (broken / "textgen.json").write_text("{not json")
        return broken, "textgen.json: not valid JSON"
    if how == "config-lacks-a-field":
        config = json.loads((broken / "textgen.json").read_text())
        del config["num_layers"]
        (broken / "textgen.json").write_text(json.dumps(config))
        return broken, "textgen.json: lacks num_layers"
    if how in CONFIG_EDITS:  # a textgen.json edited by hand, or from another export
        field, value, fragment = CONFIG_EDITS[how]
        config = json.loads((broken / "textgen.json").read_text())
        config[field] = value
        (broken / "textgen.json").write_text(json.dumps(config))
        return broken, fragment
    if how == "no-tokenizer":
        (broken / "tokenizer.json").unlink()
        return broken, "tokenizer.json"
    if how == "tokenizer-of-another-model":
        (broken / "tokenizer.json").write_text(json.dumps(larger_tokenizer(model_dir / "tokenizer.json", 10)))
        return broken, "tokenizer.json: 32010 tokens, more than the model's 32000"
    if how == "corrupt-tokenizer":
        (broken / "tokenizer.json").write_text("garbage")
        return broken, "tokenizer.json"
    raise AssertionError(how)


# Each of these started, reported SERVING, and failed every request (or said nothing of the field).
CONFIG_EDITS: dict[str, tuple[str, Any, str]] = {
    "config-more-layers": (
        "num_layers",
        3,
        "does not match the graph beside it: num_layers 3, the graph has 2",
    ),
    "config-kv-heads": ("num_kv_heads", 4, "num_kv_heads 4, the graph has 2"),
    "config-vocab": ("vocab_size", 32001, "vocab_size 32001, the graph's logits have 32000"),
    "config-dtype": ("dtype", "fp16", "dtype fp16, the graph's cache is tensor(float)"),
    "config-number-as-text": ("vocab_size", "32000", "vocab_size must be a positive integer, got '32000'"),
    "config-zero-positions": ("max_total_tokens", 0, "max_total_tokens must be a positive integer, got 0"),
    "config-eos-past-vocab": ("eos_token_id", 50000, "eos_token_id 50000 is past the vocabulary"),
    "config-newer-format": ("format_version", 4, "format 4, written by a newer textgen"),
    "config-lora": (
        "lora",
        {"slots": 2, "rank": 4, "modules": {}},
        "lora set, the graph has no adapter slots",
    ),
}

BREAKAGES = [
    *CONFIG_EDITS,
    "missing",
    "empty",
    "no-graph",
    "truncated-graph",
    "config-not-json",
    "config-lacks-a-field",
    "no-tokenizer",
    "corrupt-tokenizer",
    "tokenizer-of-another-model",
]


def larger_tokenizer(path: Path, extra: int) -> dict[str, Any]:
    """The tokenizer at `path` with `extra` tokens added after its vocabulary (another model's)."""
    tokenizer = json.loads(path.read_text())
    base = len(tokenizer["model"]["vocab"])
    for index in range(extra):
        tokenizer["added_tokens"].append(
            {"id": base + index, "content": f"<extra_{index}>", "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": True}
        )  # fmt: skip
    return tokenizer


def test_broken_model_directory_is_one_line_and_a_failed_exit(tiny_model_dir: Path, tmp_path: Path) -> None:
    cases = [_break(tiny_model_dir, tmp_path, how) for how in BREAKAGES]

    def start(model_dir: Path) -> subprocess.CompletedProcess[str]:
        args = [str(SERVER), "--model-dir", str(model_dir), "--port", "0"]
        return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)

    with ThreadPoolExecutor(max_workers=4) as pool:  # each start imports onnxruntime: run them side by side
        results = list(pool.map(start, [model_dir for model_dir, _ in cases]))
    for how, (model_dir, fragment), result in zip(BREAKAGES, cases, results, strict=True):
        lines = result.stderr.strip().splitlines()
        errors = [line for line in lines if " ERROR " in line or ": error: " in line]
        assert result.returncode != 0, (how, result.stderr)
        assert "Traceback" not in result.stderr, (how, result.stderr)
        assert len(errors) == 1, (how, result.stderr)
        assert str(model_dir) in errors[0] and fragment in errors[0], (how, errors[0])
        assert not result.stdout, (how, result.stdout)
