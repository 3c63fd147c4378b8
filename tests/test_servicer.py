"""The servicer alone, on grpcio-testing's in-memory server, with a fake scheduler and no model.

grpcio-testing runs synchronous handlers only (grpc/grpc#24942: no grpc.aio support), so a thin
adapter drives the async servicer on an event loop thread and forwards the context calls; what is
tested, codes, details, metadata and messages, is the servicer's own behaviour.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc_testing
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2
from textgen.v1 import textgen_pb2 as pb
from textgen_server.generation import GenerationRequest, TokenEvent
from textgen_server.model_config import ModelConfig
from textgen_server.request_log import RequestRecord
from textgen_server.scheduler import GenerationFailedError, QueueFullError, ShuttingDownError
from textgen_server.service import (
    DEADLINE_SKEW_S,
    QUEUE_FULL_PUSHBACK_MS,
    RETRY_PUSHBACK_HEADER,
    ModelState,
    TextGenerationService,
)
from textgen_server.stopping import FinishReason
from textgen_server.tokenizer import Tokenizer
from textgen_server.tools import ToolCall
from textgen_server.validation import UnknownAdapterError

T = TypeVar("T")
SERVICE = pb.DESCRIPTOR.services_by_name["TextGeneration"]


class FakeHandle:
    def __init__(self, request: GenerationRequest, script: Sequence[TokenEvent | Exception]) -> None:
        self.request = request
        self._script = script
        self.cancelled = False
        self.admitted: float | None = None

    def cancel(self) -> None:
        self.cancelled = True

    async def events(self) -> AsyncIterator[TokenEvent]:
        for item in self._script:
            if isinstance(item, Exception):
                raise item
            yield item


class FakeAdapters:
    """The adapter registry's view the servicer uses: the names it serves."""

    def names(self) -> frozenset[str]:
        return frozenset({"pirate"})


class FakeScheduler:
    """Answers every request with the same script of events, or refuses it."""

    def __init__(self) -> None:
        self.script: Sequence[TokenEvent | Exception] = ()
        self.refuse: Exception | None = None
        self.handles: list[FakeHandle] = []

    def submit(self, request: GenerationRequest) -> FakeHandle:
        if self.refuse is not None:
            raise self.refuse
        handle = FakeHandle(request, self.script)
        self.handles.append(handle)
        return handle


class Aborted(Exception):
    """grpc.aio's abort raises to end the handler; the adapter ends the call with the code it set."""


class AioContext:
    """grpc.aio's ServicerContext calls, forwarded to grpcio-testing's synchronous context.

    grpcio-testing's own `abort` drops trailing metadata and `abort_with_status` is unimplemented,
    so both set code, details and trailers and end the handler, as grpc's servers do.
    """

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence[tuple[str, Any]] = ()
    ) -> None:
        self._context.set_code(code)
        self._context.set_details(details)
        if trailing_metadata:
            self._context.set_trailing_metadata(trailing_metadata)
        raise Aborted

    async def abort_with_status(self, status: grpc.Status) -> None:
        await self.abort(status.code, status.details, status.trailing_metadata)

    def time_remaining(self) -> float | None:
        return None

    async def send_initial_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._context.send_initial_metadata(metadata)

    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata()


class SyncServicer:
    def __init__(self, servicer: TextGenerationService, loop: asyncio.AbstractEventLoop) -> None:
        self._servicer = servicer
        self._loop = loop

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Any:
        try:
            return self._run(self._servicer.Generate(request, AioContext(context)))  # type: ignore[arg-type]
        except Aborted:
            return None

    def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateStreamResponse]:
        stream = self._servicer.GenerateStream(request, AioContext(context))  # type: ignore[arg-type]
        while True:
            try:
                yield self._run(stream.__anext__())  # type: ignore[arg-type]
            except (StopAsyncIteration, Aborted):
                return

    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext) -> Any:
        try:
            return self._run(self._servicer.GetModelInfo(request, AioContext(context)))  # type: ignore[arg-type]
        except Aborted:
            return None


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    event_loop = asyncio.new_event_loop()
    thread = threading.Thread(target=event_loop.run_forever, daemon=True)
    thread.start()
    yield event_loop
    event_loop.call_soon_threadsafe(event_loop.stop)
    thread.join()


@pytest.fixture
def scheduler() -> FakeScheduler:
    return FakeScheduler()


@pytest.fixture
def records() -> list[RequestRecord]:
    """What the servicer reported for each call, in order."""
    return []


@pytest.fixture
def servicer(
    scheduler: FakeScheduler, tokenizer: Tokenizer, tiny_model_dir: Path, records: list[RequestRecord]
) -> TextGenerationService:
    service = TextGenerationService(
        model_name="@hf/mistral/mistral-7b-instruct-v0.2", on_request_end=records.append
    )
    config = ModelConfig.load(tiny_model_dir)
    service.model = ModelState(scheduler, tokenizer, config, "CPUExecutionProvider", FakeAdapters())  # type: ignore[arg-type]
    return service


@pytest.fixture
def server(servicer: TextGenerationService, loop: asyncio.AbstractEventLoop) -> grpc_testing.Server:
    return grpc_testing.server_from_dictionary(
        {SERVICE: SyncServicer(servicer, loop)}, grpc_testing.strict_real_time()
    )


def _event(text: str, n: int, finish: FinishReason | None = None) -> TokenEvent:
    return TokenEvent(
        token_id=100 + n, text=text, special=False, finish_reason=finish, prompt_tokens=7, completion_tokens=n
    )


SCRIPT = [_event("Hel", 1), _event("lo", 2), _event("!", 3, FinishReason.STOP)]


def _unary(
    server: grpc_testing.Server,
    request: Any,
    method: str = "Generate",
    metadata: Sequence[tuple[str, str]] = (),
) -> tuple[Any, Any, grpc.StatusCode, str]:
    rpc = server.invoke_unary_unary(SERVICE.methods_by_name[method], metadata, request, None)
    return rpc.termination()  # type: ignore[no-any-return]


def _stream(
    server: grpc_testing.Server, request: pb.GenerateRequest
) -> tuple[list[Any], grpc.StatusCode, str]:
    rpc = server.invoke_unary_stream(SERVICE.methods_by_name["GenerateStream"], (), request, None)
    messages = []
    while True:
        try:
            messages.append(rpc.take_response())
        except ValueError:  # grpcio-testing: no more responses, the RPC has terminated
            break
    _, code, details = rpc.termination()
    return messages, code, details


def _violations(trailing_metadata: Sequence[tuple[str, Any]]) -> dict[str, str]:
    raw = dict(trailing_metadata)["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(raw)
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    return {v.field: v.description for v in bad.field_violations}


def test_generate_joins_the_events(
    server: grpc_testing.Server, scheduler: FakeScheduler, tokenizer: Tokenizer
) -> None:
    scheduler.script = SCRIPT
    response, _, code, _ = _unary(
        server, pb.GenerateRequest(prompt="Hi", max_tokens=3, seed=5, temperature=1)
    )
    assert code == grpc.StatusCode.OK
    assert response.response == "Hello!"
    assert response.finish_reason == pb.FINISH_REASON_STOP
    assert (response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens) == (
        7,
        3,
        10,
    )
    (handle,) = scheduler.handles
    typed = handle.request
    assert typed.max_new_tokens == 3 and typed.sampling.seed == 5 and typed.sampling.temperature == 1.0
    assert list(typed.prompt_ids[:1]) == [tokenizer.bos_id]
    assert handle.cancelled  # always released, also on success


def test_stream_relays_each_event(server: grpc_testing.Server, scheduler: FakeScheduler) -> None:
    scheduler.script = SCRIPT
    messages, code, _ = _stream(server, pb.GenerateRequest(prompt="Hi"))
    assert code == grpc.StatusCode.OK
    assert [m.response for m in messages] == ["Hel", "lo", "!"]
    assert [m.token.id for m in messages] == [101, 102, 103]
    assert [m.finish_reason for m in messages] == [0, 0, pb.FINISH_REASON_STOP]
    assert not messages[0].HasField("usage") and messages[-1].usage.total_tokens == 10


def test_request_id_is_taken_from_metadata(server: grpc_testing.Server, scheduler: FakeScheduler) -> None:
    scheduler.script = SCRIPT
    _unary(server, pb.GenerateRequest(prompt="Hi"), metadata=(("x-request-id", "abc-123"),))
    assert scheduler.handles[0].request.request_id == "abc-123"


def test_invalid_argument_carries_bad_request(server: grpc_testing.Server, scheduler: FakeScheduler) -> None:
    request = pb.GenerateRequest(prompt="Hi", top_k=99, top_p=3, temperature=5.0000001)
    _, trailing, code, details = _unary(server, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert _violations(trailing) == {
        "top_k": "must be between 1 and 50, got 99",
        "top_p": "must be between 0 and 2, got 3",
        # Every digit sent: "got 5" beside a bound of 5 would say nothing was wrong.
        "temperature": "must be between 0 and 5, got 5.0000001",
    }
    assert "top_k" in details and scheduler.handles == []


@pytest.mark.parametrize("number", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_infinity_in_a_schema_is_invalid_argument_naming_it(
    server: grpc_testing.Server, scheduler: FakeScheduler, number: float
) -> None:
    # A Struct holds them, JSON cannot: protobuf's MessageToDict raised, and the call ended UNKNOWN.
    json_mode = pb.GenerateRequest(prompt="Hi")
    json_mode.response_format.type = "json_schema"
    json_mode.response_format.json_schema.update({"type": "object", "maxProperties": number})
    tools = pb.GenerateRequest(chat=pb.Chat(messages=[pb.Message(role="user", content="Hi")]))
    tools.chat.tools.add(name="flat").parameters.update({"type": "object", "minProperties": number})
    tools.chat.tools.add(type="function").function.name = "nested"
    tools.chat.tools[1].function.parameters.update({"type": "object", "x": [number]})
    for request, fields in [
        (json_mode, {"response_format.json_schema"}),
        (tools, {"chat.tools[0].parameters", "chat.tools[1].function.parameters"}),
    ]:
        _, trailing, code, _ = _unary(server, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        violations = _violations(trailing)
        assert set(violations) == fields
        assert all(
            text == "holds NaN or an infinity, which are not JSON numbers" for text in violations.values()
        )
    assert scheduler.handles == []


@pytest.mark.parametrize(
    ("refusal", "code"),
    [
        (QueueFullError("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (ShuttingDownError("draining"), grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_scheduler_refusals(
    server: grpc_testing.Server, scheduler: FakeScheduler, refusal: Exception, code: grpc.StatusCode
) -> None:
    scheduler.refuse = refusal
    _, _, got, details = _unary(server, pb.GenerateRequest(prompt="Hi"))
    assert (got, details) == (code, str(refusal))


def test_failure_mid_stream_is_internal(server: grpc_testing.Server, scheduler: FakeScheduler) -> None:
    scheduler.script = [_event("a", 1), GenerationFailedError("generation failed (request r1)")]
    messages, code, details = _stream(server, pb.GenerateRequest(prompt="Hi"))
    assert [m.response for m in messages] == ["a"]
    assert code == grpc.StatusCode.INTERNAL and "r1" in details


def test_shutdown_mid_stream_is_unavailable(server: grpc_testing.Server, scheduler: FakeScheduler) -> None:
    scheduler.script = [
        _event("a", 1),
        ShuttingDownError("the server shut down before this request finished"),
    ]
    _, code, details = _stream(server, pb.GenerateRequest(prompt="Hi"))
    assert code == grpc.StatusCode.UNAVAILABLE and "shut down" in details


def test_unknown_adapter_and_tools_without_grammars(server: grpc_testing.Server) -> None:
    _, _, code, details = _unary(server, pb.GenerateRequest(prompt="Hi", lora="ninja"))
    assert code == grpc.StatusCode.NOT_FOUND and "'ninja'" in details and "pirate" in details
    tool = pb.Tool(type="function", function=pb.Function(name="weather"))
    chat = pb.Chat(messages=[pb.Message(role="user", content="Hi")], tools=[tool])
    _, _, code, details = _unary(server, pb.GenerateRequest(chat=chat))  # this fixture has no GrammarCompiler
    assert code == grpc.StatusCode.UNIMPLEMENTED and details.startswith("chat.tools")


CALL = ToolCall("get_weather", {"city": "Paris", "days": 2, "hourly": [1.5, None]})


def test_tool_calls_come_whole_on_the_last_message(
    server: grpc_testing.Server, scheduler: FakeScheduler
) -> None:
    last = dataclasses.replace(_event("", 3, FinishReason.STOP), tool_calls=(CALL,))
    scheduler.script = [_event("", 1), _event("", 2), last]
    response, _, code, _ = _unary(server, pb.GenerateRequest(prompt="Hi"))
    assert code == grpc.StatusCode.OK and response.response == ""
    assert [(c.name, json_format.MessageToDict(c.arguments)) for c in response.tool_calls] == [
        ("get_weather", {"city": "Paris", "days": 2.0, "hourly": [1.5, None]})
    ]
    messages, code, _ = _stream(server, pb.GenerateRequest(prompt="Hi"))
    assert [len(m.tool_calls) for m in messages] == [0, 0, 1] and messages[
        -1
    ].tool_calls == response.tool_calls


def test_grammar_failure_mid_generation_is_internal(
    server: grpc_testing.Server, scheduler: FakeScheduler
) -> None:
    failed = dataclasses.replace(_event("", 2, FinishReason.STOP), error="step limit reached")
    scheduler.script = [_event('{"a"', 1), failed]
    messages, code, details = _stream(server, pb.GenerateRequest(prompt="Hi"))
    assert [m.response for m in messages] == ['{"a"']  # the cut JSON never ends as if it were whole
    assert code == grpc.StatusCode.INTERNAL and "step limit reached" in details


def test_adapter_that_cannot_be_loaded_while_the_request_waits_is_not_found(
    server: grpc_testing.Server, scheduler: FakeScheduler
) -> None:
    scheduler.script = [UnknownAdapterError("lora: adapter 'pirate' could not be loaded (gone)")]
    _, _, code, details = _unary(server, pb.GenerateRequest(prompt="Hi", lora="pirate"))
    assert code == grpc.StatusCode.NOT_FOUND and "'pirate' could not be loaded" in details


def test_known_adapter_reaches_the_scheduler(server: grpc_testing.Server, scheduler: FakeScheduler) -> None:
    scheduler.script = SCRIPT
    _unary(server, pb.GenerateRequest(prompt="Hi", lora="pirate"))
    assert scheduler.handles[0].request.lora == "pirate"


def test_unavailable_until_loaded(servicer: TextGenerationService, loop: asyncio.AbstractEventLoop) -> None:
    servicer.model = None
    server = grpc_testing.server_from_dictionary(
        {SERVICE: SyncServicer(servicer, loop)}, grpc_testing.strict_real_time()
    )
    for method, request in (
        ("Generate", pb.GenerateRequest(prompt="Hi")),
        ("GetModelInfo", pb.GetModelInfoRequest()),
    ):
        _, _, code, details = _unary(server, request, method)
        assert code == grpc.StatusCode.UNAVAILABLE and "loading" in details


def test_model_info(server: grpc_testing.Server) -> None:
    info, _, code, _ = _unary(server, pb.GetModelInfoRequest(), "GetModelInfo")
    assert code == grpc.StatusCode.OK
    assert info.model == "@hf/mistral/mistral-7b-instruct-v0.2" and list(info.adapters) == ["pirate"]
    assert info.max_input_length == 3072 and info.vocab_size == 32000


# -- what each call reports when it ends (metrics and the request log line come from it) ---------


def test_a_success_is_recorded_with_its_counts_and_times(
    server: grpc_testing.Server, scheduler: FakeScheduler, records: list[RequestRecord]
) -> None:
    scheduler.script = SCRIPT
    _stream(server, pb.GenerateRequest(prompt="Hi", lora="pirate", max_tokens=9))
    (record,) = records
    assert (record.method, record.code, record.finish_reason) == (
        "GenerateStream",
        grpc.StatusCode.OK,
        "stop",
    )
    assert (record.adapter, record.completion_tokens, record.max_new_tokens) == ("pirate", 3, 9)
    assert record.prompt_tokens == len(scheduler.handles[0].request.prompt_ids)
    assert record.request_id == scheduler.handles[0].request.request_id
    assert record.duration is not None and record.time_to_first_token is not None
    assert record.mean_time_per_token is not None and record.duration >= record.time_to_first_token
    assert "Hi" not in record.log_line() and f"id={record.request_id}" in record.log_line()


@pytest.mark.parametrize(
    ("request_fields", "refusal", "code"),
    [
        ({"prompt": "Hi", "top_k": 99}, None, grpc.StatusCode.INVALID_ARGUMENT),
        ({"prompt": "Hi", "lora": "ninja"}, None, grpc.StatusCode.NOT_FOUND),
        ({"prompt": "Hi"}, QueueFullError("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        ({"prompt": "Hi"}, ShuttingDownError("draining"), grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_a_refusal_is_recorded_with_its_code(
    server: grpc_testing.Server,
    scheduler: FakeScheduler,
    records: list[RequestRecord],
    request_fields: dict[str, Any],
    refusal: Exception | None,
    code: grpc.StatusCode,
) -> None:
    scheduler.refuse = refusal
    _unary(server, pb.GenerateRequest(**request_fields))
    (record,) = records
    assert record.code == code and not record.succeeded and not record.cancelled
    assert record.completion_tokens == 0 and record.first_token is None


def _leave_before_the_first_send(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client goes away before the servicer's first send, as grpc.aio then reports it."""

    async def gone(self: AioContext, metadata: Sequence[tuple[str, str]]) -> None:
        raise RuntimeError('Failed "execute_batch": (SendInitialMetadataOperation,)')

    monkeypatch.setattr(AioContext, "send_initial_metadata", gone)


def test_a_client_gone_before_the_first_send_is_recorded_as_cancelled(
    server: grpc_testing.Server, records: list[RequestRecord], monkeypatch: pytest.MonkeyPatch
) -> None:
    """grpc.aio raises from send_initial_metadata when the client left a moment before (the soak met
    it about once in 30,000 requests): the record says CANCELLED, not UNKNOWN (a server fault)."""
    _leave_before_the_first_send(monkeypatch)
    _stream(server, pb.GenerateRequest(prompt="Hi"))
    (record,) = records
    assert record.code == grpc.StatusCode.CANCELLED and record.cancelled


@pytest.mark.parametrize(
    ("remaining", "code"),
    [
        (None, grpc.StatusCode.CANCELLED),  # no deadline: the client cancelled
        (5.0, grpc.StatusCode.CANCELLED),
        (DEADLINE_SKEW_S * 2, grpc.StatusCode.CANCELLED),
        # The client's deadline fired first: the server's, counted from the call's arrival, trails it.
        (DEADLINE_SKEW_S / 10, grpc.StatusCode.DEADLINE_EXCEEDED),
        (0.0, grpc.StatusCode.DEADLINE_EXCEEDED),
        (-0.5, grpc.StatusCode.DEADLINE_EXCEEDED),
    ],
)
def test_a_client_gone_at_its_deadline_is_recorded_as_deadline_exceeded(
    server: grpc_testing.Server,
    records: list[RequestRecord],
    monkeypatch: pytest.MonkeyPatch,
    remaining: float | None,
    code: grpc.StatusCode,
) -> None:
    _leave_before_the_first_send(monkeypatch)
    monkeypatch.setattr(AioContext, "time_remaining", lambda self: remaining)
    _stream(server, pb.GenerateRequest(prompt="Hi"))
    (record,) = records
    assert record.code == code and record.cancelled


def test_a_failure_mid_stream_is_recorded_as_internal(
    server: grpc_testing.Server, scheduler: FakeScheduler, records: list[RequestRecord]
) -> None:
    scheduler.script = [_event("a", 1), GenerationFailedError("generation failed (request r1)")]
    _stream(server, pb.GenerateRequest(prompt="Hi"))
    (record,) = records
    assert (record.code, record.completion_tokens, record.finish_reason) == (
        grpc.StatusCode.INTERNAL,
        1,
        None,
    )


def test_queue_full_tells_the_client_when_to_retry(
    server: grpc_testing.Server, scheduler: FakeScheduler
) -> None:
    scheduler.refuse = QueueFullError("full")
    _, trailing, code, _ = _unary(server, pb.GenerateRequest(prompt="Hi"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(trailing)[RETRY_PUSHBACK_HEADER] == str(QUEUE_FULL_PUSHBACK_MS)


@pytest.mark.parametrize("unsafe", ["two words", "line\nbreak", "x" * 129, "k=v"])
def test_a_request_id_unfit_for_a_log_line_is_replaced(
    server: grpc_testing.Server, scheduler: FakeScheduler, unsafe: str
) -> None:
    scheduler.script = SCRIPT
    _unary(server, pb.GenerateRequest(prompt="Hi"), metadata=(("x-request-id", unsafe),))
    request_id = scheduler.handles[0].request.request_id
    assert request_id != unsafe and len(request_id) == 32
