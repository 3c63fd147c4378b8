"""The gRPC server end to end on the tiny demo model: results, errors, cancellation, load, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from server_harness import ServerThread
from textgen.v1 import textgen_pb2 as pb
from textgen.v1 import textgen_pb2_grpc as rpc
from textgen_server.app import HealthServicer
from textgen_server.prompt import encode_prompt
from textgen_server.scheduler import SchedulerLimits
from textgen_server.tokenizer import Tokenizer
from transformers import MistralForCausalLM


def _bad_request_fields(error: grpc.RpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no rich status details"
    fields: dict[str, str] = {}
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        assert detail.Unpack(bad)
        fields.update({v.field: v.description for v in bad.field_violations})
    return fields


def test_generate_equals_transformers_greedy(
    stub: rpc.TextGenerationStub, tokenizer: Tokenizer, tiny_model_dir: Path
) -> None:
    prompt = "Write a haiku about the sea."
    response = stub.Generate(pb.GenerateRequest(prompt=prompt, max_tokens=20, temperature=0))
    ids = encode_prompt(tokenizer, prompt, raw=False)
    model = MistralForCausalLM.from_pretrained(tiny_model_dir / "checkpoint").eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, pad_token_id=0)
    expected_ids = out[0, len(ids) :].tolist()
    expected = tokenizer.decode([t for t in expected_ids if t != tokenizer.eos_id])
    assert response.response == expected
    assert response.usage.prompt_tokens == len(ids)
    assert response.usage.completion_tokens == len(expected_ids)
    assert response.usage.total_tokens == len(ids) + len(expected_ids)
    stop_reason = pb.FINISH_REASON_STOP if tokenizer.eos_id in expected_ids else pb.FINISH_REASON_LENGTH
    assert response.finish_reason == stop_reason


def test_stream_deltas_concatenate_to_the_unary_response(stub: rpc.TextGenerationStub) -> None:
    request = pb.GenerateRequest(prompt="Tell me a story", max_tokens=40, seed=42, temperature=1.0, top_k=40)
    unary = stub.Generate(request)
    chunks = list(stub.GenerateStream(request))
    assert "".join(c.response for c in chunks) == unary.response
    assert [c.finish_reason for c in chunks[:-1]] == [pb.FINISH_REASON_UNSPECIFIED] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == unary.finish_reason
    assert chunks[-1].usage == unary.usage
    assert len(chunks) == unary.usage.completion_tokens


def test_chat_is_accepted(stub: rpc.TextGenerationStub) -> None:
    chat = pb.Chat(
        messages=[pb.Message(role="system", content="Be brief."), pb.Message(role="user", content="Hi")]
    )
    response = stub.Generate(pb.GenerateRequest(chat=chat, max_tokens=4, temperature=0))
    assert response.usage.completion_tokens == 4


@pytest.mark.parametrize(
    ("request_fields", "field", "fragment"),
    [
        ({"prompt": ""}, "prompt", "1 to 6144"),
        ({"prompt": "x" * 6145}, "prompt", "got 6145"),
        ({"prompt": "hi", "temperature": 5.5}, "temperature", "between 0 and 5"),
        ({"prompt": "hi", "top_k": 51}, "top_k", "between 1 and 50"),
        ({"prompt": "hi", "seed": 0}, "seed", "between 1 and 9999999999"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens", "at least 1"),
        ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({}, "input", "one of prompt or chat"),
        (
            {"chat": pb.Chat(messages=[pb.Message(role="assistant", content="x")])},
            "chat.messages[0].role",
            "user",
        ),
        (
            {"chat": pb.Chat(messages=[pb.Message(role="user", content="x" * 6145)])},
            "chat.messages[0].content",
            "6144",
        ),
    ],
)
def test_bad_input_names_the_field(
    stub: rpc.TextGenerationStub, request_fields: dict[str, object], field: str, fragment: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(pb.GenerateRequest(**request_fields))  # type: ignore[arg-type]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = _bad_request_fields(caught.value)
    assert field in fields and fragment in fields[field], fields


def test_token_limits_name_both_numbers(stub: rpc.TextGenerationStub) -> None:
    digits = "7" * 6000  # the tokenizer splits digits: 6000+ tokens within the 6144 characters
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(pb.GenerateRequest(prompt=digits, raw=True, max_tokens=1))
    fields = _bad_request_fields(caught.value)
    assert "max_input_length=3072" in fields["input"]
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(pb.GenerateRequest(prompt="7" * 2000, raw=True, max_tokens=4000))
    fields = _bad_request_fields(caught.value)
    assert "max_total_tokens=4096" in fields["max_tokens"] and "max_tokens 4000" in fields["max_tokens"]


def test_unknown_adapter_is_not_found(stub: rpc.TextGenerationStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(pb.GenerateRequest(prompt="hi", lora="pirate"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "pirate" in (caught.value.details() or "")


def test_cancelled_stream_stops_within_a_step(server: ServerThread, stub: rpc.TextGenerationStub) -> None:
    scheduler = server.server.scheduler
    assert scheduler is not None
    stream = stub.GenerateStream(
        pb.GenerateRequest(prompt="Count to a thousand", max_tokens=3000, temperature=0)
    )
    for _, _ in zip(range(3), stream, strict=False):
        pass
    assert scheduler.running_count == 1
    steps_at_cancel = scheduler.stats.steps
    stream.cancel()
    deadline = time.monotonic() + 10
    while scheduler.running_count and time.monotonic() < deadline:
        time.sleep(0.001)
    assert scheduler.running_count == 0
    # The cancel travels to the server in milliseconds (a few tiny-model steps, tens on a loaded
    # machine); the scheduler then retires it within one step (test_batching.py counts that exactly).
    # Far from its 3000 tokens:
    assert scheduler.stats.steps - steps_at_cancel < 1000
    assert stub.Generate(pb.GenerateRequest(prompt="still there?", max_tokens=3)).usage.completion_tokens == 3


# What onnxruntime's arena raises when an allocation fails (CUDA's and the CPU's alike).
_ORT_OUT_OF_MEMORY = (
    "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running "
    "GroupQueryAttention node. Status Message: bfc_arena.cc:376 void* onnxruntime::BFCArena::"
    "AllocateRawInternal(...) Failed to allocate memory for requested buffer of size 1610612736"
)


def test_prefill_out_of_memory_is_resource_exhausted_for_that_request_alone(
    server: ServerThread, stub: rpc.TextGenerationStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    scheduler = server.server.scheduler
    assert scheduler is not None
    real_prefill = scheduler.engine.prefill

    def out_of_memory_past_200(slot: int, tokens: Sequence[int], start: int = 0, adapter: int = 0) -> Any:
        if start + len(tokens) > 200:
            raise RuntimeError(_ORT_OUT_OF_MEMORY)
        return real_prefill(slot, tokens, start, adapter)

    monkeypatch.setattr(scheduler.engine, "prefill", out_of_memory_past_200)
    stream = stub.GenerateStream(
        pb.GenerateRequest(prompt="Count to a thousand", max_tokens=100, temperature=0)
    )
    first = next(stream)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(pb.GenerateRequest(prompt="word " * 400, max_tokens=4))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "out of memory prefilling the prompt" in caught.value.details()
    assert "bfc_arena" not in caught.value.details()  # the server's internals stay in its log
    chunks = [first, *stream]
    assert len(chunks) == 100 and chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    # Any other failure of a pass is the server's fault: INTERNAL.
    monkeypatch.setattr(scheduler.engine, "prefill", lambda *args, **kwargs: 1 / 0)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(pb.GenerateRequest(prompt="Hi", max_tokens=4))
    assert caught.value.code() == grpc.StatusCode.INTERNAL


def test_the_event_loop_serves_on_while_a_request_is_validated(
    server: ServerThread, stub: rpc.TextGenerationStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation (tokenizing a long chat, compiling a large schema: up to a tenth of a second) runs
    off the event loop, which meanwhile sends every running stream its tokens. Before, a schema
    of 30 KB stalled every stream for as long as it compiled."""
    from textgen_server import service as service_module

    real_build = service_module.build_request
    loop_ran = threading.Event()

    def slow_build(request: pb.GenerateRequest, **kwargs: Any) -> Any:
        if request.prompt == "slow to validate":
            server.loop.call_soon_threadsafe(loop_ran.set)  # runs only if the loop is free
            assert loop_ran.wait(timeout=10), "the event loop waited for the validation"
        return real_build(request, **kwargs)

    monkeypatch.setattr(service_module, "build_request", slow_build)
    reply = stub.Generate(pb.GenerateRequest(prompt="slow to validate", max_tokens=2))
    assert loop_ran.is_set() and reply.usage.completion_tokens == 2


def test_requests_are_validated_on_at_most_validation_workers_threads(
    server: ServerThread, stub: rpc.TextGenerationStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    from textgen_server import service as service_module

    real_build = service_module.build_request
    lock = threading.Lock()
    running, most, threads = 0, 0, set()

    def counted_build(request: pb.GenerateRequest, **kwargs: Any) -> Any:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            threads.add(threading.current_thread().name)
        time.sleep(0.2)  # long enough for the others to arrive meanwhile
        with lock:
            running -= 1
        return real_build(request, **kwargs)

    monkeypatch.setattr(service_module, "build_request", counted_build)
    with ThreadPoolExecutor(6) as clients:
        replies = list(
            clients.map(stub.Generate, [pb.GenerateRequest(prompt=f"Hi {i}", max_tokens=1) for i in range(6)])
        )
    assert [reply.usage.completion_tokens for reply in replies] == [1] * 6
    assert server.server.settings.validation_workers == 2
    assert most == 2, most  # the default --validation-workers, and never more
    assert threads and all(name.startswith("textgen-validate") for name in threads), threads


def test_validation_workers_is_an_option_of_at_least_one(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from textgen_server.__main__ import parse_args

    base = ["--model-dir", str(tiny_model_dir)]
    assert parse_args(base).validation_workers == 2
    assert parse_args([*base, "--validation-workers", "3"]).validation_workers == 3
    with pytest.raises(SystemExit):
        parse_args([*base, "--validation-workers", "0"])
    assert "--validation-workers must be 1 to " in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--port", "70000"], "--port must be 0 to 65535, got 70000"),  # grpc served on 70000 % 65536
        (["--port", "-1"], "--port must be 0 to 65535, got -1"),
        (["--metrics-port", "70000"], "--metrics-port must be 0 to 65535"),  # an OverflowError traceback
        (["--max-message-bytes", "99999999999"], "--max-message-bytes must be 1024 to 2147483647"),
        (["--max-concurrent-requests", "2147483640"], "--max-concurrent-requests must be 1 to 2147483615"),
        (["--threads", "-1"], "--threads must be 0 (one per physical core) to 1024, got -1"),
        (["--threads", "1000000"], "--threads must be 0"),  # started threads until the kernel killed it
        (["--grace", "-5"], "--grace must be 0 or more seconds, got -5"),
        (
            ["--prefill-chunk-tokens", "9000", "--max-batch-prefill-tokens", "512"],
            "--prefill-chunk-tokens 9000 must not exceed --max-batch-prefill-tokens 512",
        ),
    ],
)
def test_flags_out_of_range_are_usage_errors_naming_the_range(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    from textgen_server.__main__ import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--model-dir", str(tiny_model_dir), *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_deadline_stops_generation(server: ServerThread, stub: rpc.TextGenerationStub) -> None:
    scheduler = server.server.scheduler
    assert scheduler is not None
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(pb.GenerateRequest(prompt="Go on forever", max_tokens=3500, temperature=0), timeout=0.2)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 10
    while scheduler.running_count and time.monotonic() < deadline:
        time.sleep(0.001)
    assert scheduler.running_count == 0


def test_fifty_concurrent_streams_complete(stub: rpc.TextGenerationStub) -> None:
    requests = [
        pb.GenerateRequest(
            prompt=f"Request number {i}", max_tokens=24, temperature=0.0 if i % 2 else 0.8, seed=1000 + i
        )
        for i in range(50)
    ]
    alone = [stub.Generate(r) for r in requests]  # one at a time: the reference

    def run(request: pb.GenerateRequest) -> tuple[str, pb.Usage, int]:
        chunks = list(stub.GenerateStream(request))
        return "".join(c.response for c in chunks), chunks[-1].usage, chunks[-1].finish_reason

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(run, requests))
    for (text, usage, finish), expected in zip(results, alone, strict=True):
        assert (text, usage, finish) == (expected.response, expected.usage, expected.finish_reason)
        assert finish != pb.FINISH_REASON_UNSPECIFIED


def test_model_info(stub: rpc.TextGenerationStub) -> None:
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.max_input_length, info.max_total_tokens, info.max_batch_prefill_tokens) == (3072, 4096, 8192)
    assert info.execution_provider == "CPUExecutionProvider" and info.dtype == "fp32"
    # The default KV budget, 65536 positions, in slots of 4096: 16 slots of the tiny model's
    # 2 layers x (keys, values) x 2 KV heads x 16 dims x 4 bytes per position.
    assert info.kv_slots == 16
    assert info.kv_cache_bytes == 16 * 4096 * 2 * 2 * 2 * 16 * 4


@pytest.mark.parametrize(("configured", "reported"), [(100, 100), (20000, 8192)])
def test_model_info_reports_the_prefill_limit_in_effect(
    tiny_model_dir: Path, configured: int, reported: int
) -> None:
    # --max-batch-prefill-tokens, capped by the model's own limit (the card's 8192).
    harness = ServerThread(tiny_model_dir, limits=SchedulerLimits(max_batch_prefill_tokens=configured))
    try:
        with grpc.insecure_channel(harness.target) as channel:
            info = rpc.TextGenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest())
        assert info.max_batch_prefill_tokens == reported
    finally:
        harness.stop(grace=0)


def test_health_and_unavailable_while_loading(tiny_model_dir: Path) -> None:
    harness = ServerThread(tiny_model_dir, load=False)
    try:
        with grpc.insecure_channel(harness.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert (
                health.Check(health_pb2.HealthCheckRequest()).status
                == health_pb2.HealthCheckResponse.NOT_SERVING
            )
            with pytest.raises(grpc.RpcError) as caught:
                rpc.TextGenerationStub(channel).Generate(pb.GenerateRequest(prompt="hi"))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            harness.call(harness.server.load_model())
            service = "textgen.v1.TextGeneration"
            assert (
                health.Check(health_pb2.HealthCheckRequest(service=service)).status
                == health_pb2.HealthCheckResponse.SERVING
            )
    finally:
        harness.stop(grace=0)


def test_health_list_answers_what_check_does(tiny_model_dir: Path) -> None:
    # grpcio-health-checking's asyncio servicer leaves List unimplemented; grpcurl and probes call it.
    harness = ServerThread(tiny_model_dir, load=False)
    service = "textgen.v1.TextGeneration"
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    try:
        with grpc.insecure_channel(harness.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def listed() -> dict[str, int]:
                statuses = health.List(health_pb2.HealthListRequest(), timeout=5).statuses
                return {name: response.status for name, response in statuses.items()}

            assert listed() == {"": not_serving, service: not_serving}
            harness.call(harness.server.load_model())
            assert listed() == {"": serving, service: serving}
    finally:
        harness.stop(grace=0)


def test_health_refuses_service_names_no_service_has(
    stub: rpc.TextGenerationStub, server: ServerThread
) -> None:
    """Health answers without a token: each Watch held the megabyte-long name it was sent."""
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        long_name = "x" * 201
        for call in (
            lambda: health.Check(health_pb2.HealthCheckRequest(service=long_name), timeout=5),
            lambda: next(health.Watch(health_pb2.HealthCheckRequest(service=long_name), timeout=5)),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details() == "service: at most 200 characters, got 201"
        watch = health.Watch(health_pb2.HealthCheckRequest(service="textgen.v1.TextGeneration"), timeout=5)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


class _WatchContext:
    """A Watch call's context whose writes reach a client as fast as `reading` lets them."""

    def __init__(self, reading: bool) -> None:
        self.reading = reading
        self.written: asyncio.Queue[int] = asyncio.Queue()

    async def write(self, message: health_pb2.HealthCheckResponse) -> None:
        self.written.put_nowait(message.status)
        if not self.reading:  # a client with an HTTP/2 window of 0: the write never completes
            await asyncio.Event().wait()


async def test_a_health_watch_nobody_reads_holds_up_no_status_change() -> None:
    """grpcio-health-checking's Watch wrote under the lock `set` takes: one client that stopped
    reading kept the server from ever reporting SERVING, and from finishing its shutdown."""
    statuses = health_pb2.HealthCheckResponse
    servicer = HealthServicer()
    service = "textgen.v1.TextGeneration"
    await servicer.set(service, statuses.NOT_SERVING)
    stalled, reader = _WatchContext(reading=False), _WatchContext(reading=True)
    request = health_pb2.HealthCheckRequest(service=service)
    watches = [asyncio.create_task(servicer.Watch(request, context)) for context in (stalled, reader)]
    assert await asyncio.wait_for(stalled.written.get(), 5) == statuses.NOT_SERVING
    assert await asyncio.wait_for(reader.written.get(), 5) == statuses.NOT_SERVING
    await asyncio.wait_for(servicer.set(service, statuses.SERVING), 5)
    assert await asyncio.wait_for(reader.written.get(), 5) == statuses.SERVING
    await asyncio.wait_for(servicer.enter_graceful_shutdown(), 5)
    assert await asyncio.wait_for(reader.written.get(), 5) == statuses.NOT_SERVING
    for watch in watches:
        watch.cancel()
    await asyncio.gather(*watches, return_exceptions=True)
    assert service not in servicer._server_watchers  # the watchers' bookkeeping is undone


def test_shutdown_tells_clients_in_flight(tiny_model_dir: Path) -> None:
    harness = ServerThread(tiny_model_dir)
    with grpc.insecure_channel(harness.target) as channel:
        stub = rpc.TextGenerationStub(channel)
        stream = stub.GenerateStream(pb.GenerateRequest(prompt="long", max_tokens=3500, temperature=0))
        next(stream)
        stopper = threading.Thread(target=harness.stop, kwargs={"grace": 0.2})
        stopper.start()
        with pytest.raises(grpc.RpcError) as caught:
            for _ in stream:
                pass
        stopper.join()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shut down" in (caught.value.details() or "")


def test_stop_string_ends_generation_and_is_never_emitted(stub: rpc.TextGenerationStub) -> None:
    request = pb.GenerateRequest(prompt="Say something long", max_tokens=40, temperature=0)
    full = stub.Generate(request).response
    assert len(full) > 20
    stop = full[len(full) // 2 : len(full) // 2 + 5]  # likely spans a token boundary
    request.stop.append(stop)
    stopped = stub.Generate(request)
    assert stopped.response == full[: full.find(stop)]
    assert stopped.finish_reason == pb.FINISH_REASON_STOP
    chunks = list(stub.GenerateStream(request))
    assert "".join(c.response for c in chunks) == stopped.response


def test_deadline_during_a_long_prefill_leaves_running_requests_alone(stub: rpc.TextGenerationStub) -> None:
    """Issue 14, cause 1, as reported: a deadline during a prefill failed every running request.

    Deadlines from 20 to 300 ms, one after another, so that some land inside a 3000-token prefill
    whatever this machine's speed (tests/test_isolation.py pins the same case down deterministically).
    """
    steady = pb.GenerateRequest(prompt="Hi", max_tokens=2000, temperature=0)
    expected = stub.Generate(steady)
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(stub.Generate, steady)
        time.sleep(0.2)
        for deadline_ms in range(20, 320, 20):
            try:  # a random-weight model may end on EOS before a long deadline: that is fine too
                stub.Generate(
                    pb.GenerateRequest(prompt="x" * 6000, raw=True, max_tokens=400),
                    timeout=deadline_ms / 1000,
                )
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert running.result(timeout=120).response == expected.response


def test_tiny_in_bounds_sampling_values_work_beside_other_requests(stub: rpc.TextGenerationStub) -> None:
    """Issue 14, cause 2: 5e-324 rounds to 0 in float32; the step crashed and took its batch down."""
    tiny = pb.GenerateRequest(
        prompt="Hi", max_tokens=4, seed=1, temperature=5e-324, repetition_penalty=5e-324, top_k=1
    )
    neighbour = pb.GenerateRequest(prompt="Tell me a story", max_tokens=60, temperature=0)
    expected = stub.Generate(neighbour).response
    with ThreadPoolExecutor(max_workers=4) as pool:
        beside = pool.submit(stub.Generate, neighbour)
        tiny_results = [pool.submit(stub.Generate, tiny) for _ in range(3)]
        assert beside.result(timeout=60).response == expected
        answers = {f.result(timeout=60).response for f in tiny_results}
    assert len(answers) == 1  # greedy in the limit: the same every time
