"""The SDK against a fake in-process server: requests built from the arguments, results and
errors converted, streams, Workers AI bodies, the exception mapping and strict typing."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import textgen
from _fake_server import FakeTextGeneration, serve
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from textgen import (
    APIStatusError,
    AsyncClient,
    Chunk,
    Client,
    Completion,
    FieldViolation,
    FlatTool,
    InvalidArgumentError,
    ModelInfo,
    NotFoundError,
    Stream,
    TextgenError,
    Token,
    Tool,
    ToolCall,
    Usage,
    _retry,
    error_from_status,
)
from textgen._convert import completion_from_proto, dict_to_struct, request_from_body, struct_to_dict
from textgen.v1 import textgen_pb2

ROOT = Path(__file__).resolve().parents[1]
SAMPLING = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
)
WEATHER_TOOL: Tool = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "the city"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTextGeneration]:
    monkeypatch.setattr(_retry, "backoff", lambda retries_done, **_: 0.0)
    with serve() as server:
        yield server


@pytest.fixture
def client(fake: FakeTextGeneration) -> Iterator[Client]:
    with Client(fake.target, timeout=5) as c:
        yield c


# -- requests -----------------------------------------------------------------------------------


def test_generate_returns_a_completion(client: Client, fake: FakeTextGeneration) -> None:
    completion = client.generate("Hello big world")
    assert completion == Completion(
        response="Hello big world",
        tool_calls=[],
        usage=Usage(prompt_tokens=3, completion_tokens=3, total_tokens=6),
        finish_reason="stop",
        request_id=fake.metadata[-1]["x-request-id"],
    )


def test_unset_arguments_leave_optional_fields_unset(client: Client, fake: FakeTextGeneration) -> None:
    client.generate("Hi")
    request = fake.requests[-1]
    assert request.WhichOneof("input") == "prompt"
    assert [name for name in SAMPLING if request.HasField(name)] == []  # type: ignore[arg-type]
    assert (request.raw, request.lora, list(request.stop)) == (False, "", [])


def test_every_argument_reaches_the_request(client: Client, fake: FakeTextGeneration) -> None:
    client.generate(
        "Hi",
        raw=True,
        lora="pirate",
        max_tokens=16,
        temperature=0.0,
        top_p=0.5,
        top_k=50,
        seed=9_999_999_999,
        repetition_penalty=1.25,
        frequency_penalty=2.0,
        presence_penalty=0.0,
        stop=["\n", "END"],
    )
    request = fake.requests[-1]
    assert all(request.HasField(name) for name in SAMPLING)  # type: ignore[arg-type]
    assert (request.raw, request.lora, request.max_tokens, request.top_k) == (True, "pirate", 16, 50)
    assert request.seed == 9_999_999_999  # needs int64
    assert (request.temperature, request.top_p, request.repetition_penalty) == (0.0, 0.5, 1.25)
    assert (request.frequency_penalty, request.presence_penalty) == (2.0, 0.0)
    assert list(request.stop) == ["\n", "END"]


def test_a_single_stop_string_is_one_stop(client: Client, fake: FakeTextGeneration) -> None:
    client.generate("Hi", stop="END")
    assert list(fake.requests[-1].stop) == ["END"]


def test_chat_sends_messages_and_tools_and_returns_tool_calls(
    client: Client, fake: FakeTextGeneration
) -> None:
    completion = client.chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER_TOOL],
        temperature=0.2,
    )
    assert completion.tool_calls == [
        ToolCall(name="get_weather", arguments={"text": "Weather in Paris?", "n": 3})
    ]
    assert isinstance(completion.tool_calls[0].arguments["n"], int)  # Struct doubles come back as JSON ints
    request = fake.requests[-1]
    assert request.WhichOneof("input") == "chat"
    assert [(m.role, m.content) for m in request.chat.messages] == [
        ("system", "Be brief."),
        ("user", "Weather in Paris?"),
    ]
    tool = request.chat.tools[0]
    assert (tool.type, tool.function.name, tool.function.description) == (
        "function",
        "get_weather",
        "Weather in a city",
    )
    assert struct_to_dict(tool.function.parameters) == WEATHER_TOOL["function"]["parameters"]
    assert request.HasField("temperature") and not request.HasField("max_tokens")


def test_flat_tools_tool_choice_and_response_format_are_sent(
    client: Client, fake: FakeTextGeneration
) -> None:
    flat: FlatTool = {"name": "get_weather", "parameters": WEATHER_TOOL["function"]["parameters"]}
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    client.chat(
        [{"role": "user", "content": "Hi"}],
        tools=[flat, WEATHER_TOOL],
        tool_choice="get_weather",
        response_format={"type": "json_schema", "json_schema": schema},
    )
    request = fake.requests[-1]
    flat_sent, _ = request.chat.tools
    # The flat form is sent in the card's form.
    assert (flat_sent.type, flat_sent.function.name, flat_sent.name) == ("function", "get_weather", "")
    assert struct_to_dict(flat_sent.function.parameters) == WEATHER_TOOL["function"]["parameters"]
    assert request.chat.tool_choice == "get_weather"
    assert request.response_format.type == "json_schema"
    assert struct_to_dict(request.response_format.json_schema) == schema
    client.generate("Hi", response_format={"type": "json_object"})
    assert fake.requests[-1].response_format.type == "json_object"
    assert not fake.requests[-1].response_format.HasField("json_schema")


def test_tool_messages_carry_their_name(client: Client, fake: FakeTextGeneration) -> None:
    client.chat(
        [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": '{"name":"get_weather","arguments":{"city":"Oslo"}}'},
            {"role": "tool", "name": "get_weather", "content": "sunny"},
        ]
    )
    assert [(m.role, m.name) for m in fake.requests[-1].chat.messages] == [
        ("user", ""),
        ("assistant", ""),
        ("tool", "get_weather"),
    ]


def test_stream_tool_calls_arrive_on_the_last_chunk(client: Client) -> None:
    chunks = list(client.chat([{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL], stream=True))
    assert [len(chunk.tool_calls) for chunk in chunks] == [0] * (len(chunks) - 1) + [1]
    assert chunks[-1].tool_calls == [ToolCall(name="get_weather", arguments={"text": "Weather?", "n": 3})]


def test_struct_round_trip_keeps_json_values() -> None:
    value = {"a": 1, "b": 1.5, "c": [1, "x", None, True], "d": {"e": -2}, "big": 2**60 * 1.0}
    back = struct_to_dict(dict_to_struct(value))
    assert back == value
    assert isinstance(back["a"], int) and isinstance(back["b"], float) and isinstance(back["big"], float)


def test_model_info(client: Client) -> None:
    assert client.model_info() == ModelInfo(
        model="@hf/mistral/mistral-7b-instruct-v0.2",
        dtype="fp32",
        execution_provider="CPUExecutionProvider",
        max_input_length=3072,
        max_total_tokens=4096,
        max_batch_prefill_tokens=8192,
        vocab_size=32000,
        adapters=["pirate"],
    )


# -- streams ------------------------------------------------------------------------------------


def test_stream_deltas_concatenate_and_the_last_chunk_finishes(client: Client) -> None:
    stream = client.generate("one two three", max_tokens=2, stream=True)
    assert isinstance(stream, Stream)
    chunks = list(stream)
    assert "".join(c.response for c in chunks) == "one two"
    assert chunks[0] == Chunk(
        response="one", token=Token(id=100, text="one", special=False), finish_reason=None, usage=None
    )
    assert chunks[-1] == Chunk(
        response="",
        token=None,
        finish_reason="length",
        usage=Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5),
    )
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])


def test_closing_a_stream_cancels_the_call_on_the_server(client: Client, fake: FakeTextGeneration) -> None:
    with client.generate("endless", stream=True) as stream:
        assert next(stream).response == " x"
    assert fake.client_left.wait(3)  # well before the 5 s the stream would last


async def test_closing_an_async_stream_cancels_the_call_on_the_server(fake: FakeTextGeneration) -> None:
    async with AsyncClient(fake.target, timeout=5) as client:
        async with await client.generate("endless", stream=True) as stream:
            assert (await stream.__anext__()).response == " x"
        # Wait off the event loop: grpc.aio needs the loop to send the cancellation.
        assert await asyncio.to_thread(fake.client_left.wait, 3)


def test_closing_a_stream_from_another_thread_cancels_it(client: Client, fake: FakeTextGeneration) -> None:
    """A cancel button or watchdog calls close() while another thread iterates: it raised
    "generator already executing" there, and the server generated on."""
    stream = client.generate("endless", stream=True)
    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(lambda: [chunk.response for chunk in stream])
        assert fake.client_left.wait(0.5) is False  # the stream runs
        stream.close()
        with pytest.raises(textgen.RequestCancelledError):
            reading.result(timeout=3)
    assert fake.client_left.wait(3)


async def test_closing_an_async_stream_from_another_task_cancels_it(fake: FakeTextGeneration) -> None:
    async with AsyncClient(fake.target, timeout=10) as client:
        stream = await client.generate("endless", stream=True)

        async def read() -> list[str]:
            return [chunk.response async for chunk in stream]

        reading = asyncio.ensure_future(read())
        await asyncio.sleep(0.3)
        await stream.close()
        with pytest.raises(textgen.RequestCancelledError, match="the stream was closed during the call"):
            await reading
        assert not reading.cancelled()
        assert await asyncio.to_thread(fake.client_left.wait, 3)


def test_closing_the_client_while_a_call_waits_to_retry_raises_request_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It raised RuntimeError("the client is closed") from the retry after the wait."""
    monkeypatch.setattr(_retry, "backoff", lambda retries_done, **_: 0.5)
    client = Client("127.0.0.1:1", timeout=5, max_retries=3)  # nothing listens: UNAVAILABLE, retried
    with ThreadPoolExecutor(2) as pool:
        unary = pool.submit(client.generate, "Hi")
        stream = pool.submit(lambda: list(client.generate("Hi", stream=True)))
        time.sleep(0.2)  # both wait for their first retry
        client.close()
        for call in (unary, stream):
            with pytest.raises(
                textgen.RequestCancelledError, match="client was closed while the call waited"
            ):
                call.result(timeout=3)


async def test_closing_the_async_client_while_a_call_waits_to_retry_raises_request_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_retry, "backoff", lambda retries_done, **_: 0.5)
    client = AsyncClient("127.0.0.1:1", timeout=5, max_retries=3)

    async def stream() -> list[Chunk]:
        return [chunk async for chunk in await client.generate("Hi", stream=True)]

    tasks = [asyncio.ensure_future(client.generate("Hi")), asyncio.ensure_future(stream())]
    await asyncio.sleep(0.2)
    await client.close()
    for task in tasks:
        with pytest.raises(textgen.RequestCancelledError, match="client was closed while the call waited"):
            await task


async def test_closing_the_async_client_mid_call_raises_what_the_sync_client_raises(
    fake: FakeTextGeneration,
) -> None:
    """close() cancels the calls in flight: RequestCancelledError in the tasks that wait on them, as
    the sync client gives, not a CancelledError for a task nobody cancelled."""
    client = AsyncClient(fake.target, timeout=10)

    async def unary() -> None:
        await client.generate("slow")

    async def stream() -> None:
        async for _ in await client.generate("endless", stream=True):
            pass

    tasks = [asyncio.ensure_future(unary()), asyncio.ensure_future(stream())]
    await asyncio.sleep(0.3)  # both calls are on the server
    await client.close()
    for task in tasks:
        with pytest.raises(textgen.RequestCancelledError, match="closed during the call"):
            await task
        assert not task.cancelled()
    # A task that is itself cancelled still ends cancelled.
    async with AsyncClient(fake.target, timeout=10) as client:
        task = asyncio.ensure_future(client.generate("slow"))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# -- errors -------------------------------------------------------------------------------------


def test_invalid_argument_carries_the_field_violations(client: Client, fake: FakeTextGeneration) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        client.generate("Hi", max_tokens=0)
    error = info.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == "invalid GenerateRequest"
    assert error.field_violations == [FieldViolation(field="max_tokens", description="must be >= 1, got 0")]
    assert error.request_id == fake.metadata[-1]["x-request-id"]
    assert str(error) == f"INVALID_ARGUMENT: invalid GenerateRequest [request_id={error.request_id}]"
    assert isinstance(error.__cause__, grpc.RpcError)


def test_stream_errors_are_raised_from_iteration(client: Client) -> None:
    stream = client.generate("Hi", max_tokens=0, stream=True)
    with pytest.raises(InvalidArgumentError) as info:
        next(stream)
    assert info.value.field_violations[0].field == "max_tokens"


def test_unknown_adapter_is_not_found(client: Client) -> None:
    with pytest.raises(NotFoundError, match="unknown adapter 'missing'"):
        client.chat([{"role": "user", "content": "Hi"}], lora="missing")


def test_timeout_is_deadline_exceeded(fake: FakeTextGeneration) -> None:
    with Client(fake.target, timeout=0.2) as client, pytest.raises(textgen.DeadlineExceededError):
        client.generate("slow")
    assert fake.calls == 1  # not retried


ALL_ERRORS = {
    grpc.StatusCode.CANCELLED: textgen.RequestCancelledError,
    grpc.StatusCode.UNKNOWN: textgen.UnknownError,
    grpc.StatusCode.INVALID_ARGUMENT: textgen.InvalidArgumentError,
    grpc.StatusCode.DEADLINE_EXCEEDED: textgen.DeadlineExceededError,
    grpc.StatusCode.NOT_FOUND: textgen.NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: textgen.AlreadyExistsError,
    grpc.StatusCode.PERMISSION_DENIED: textgen.PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: textgen.ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: textgen.FailedPreconditionError,
    grpc.StatusCode.ABORTED: textgen.AbortedError,
    grpc.StatusCode.OUT_OF_RANGE: textgen.OutOfRangeError,
    grpc.StatusCode.UNIMPLEMENTED: textgen.UnimplementedError,
    grpc.StatusCode.INTERNAL: textgen.InternalError,
    grpc.StatusCode.UNAVAILABLE: textgen.UnavailableError,
    grpc.StatusCode.DATA_LOSS: textgen.DataLossError,
    grpc.StatusCode.UNAUTHENTICATED: textgen.UnauthenticatedError,
}


@pytest.mark.parametrize(
    "code", [c for c in grpc.StatusCode if c != grpc.StatusCode.OK], ids=lambda c: c.name
)
def test_every_status_code_has_its_own_exception(code: grpc.StatusCode) -> None:
    error = error_from_status(code, "boom")
    assert type(error) is ALL_ERRORS[code]
    assert isinstance(error, APIStatusError) and isinstance(error, TextgenError)
    assert (error.code, error.message, error.field_violations) == (code, "boom", [])
    assert str(error) == f"{code.name}: boom"


def test_error_classes_are_distinct_and_exported() -> None:
    assert len(set(ALL_ERRORS.values())) == len(ALL_ERRORS)
    assert all(getattr(textgen, cls.__name__) is cls for cls in ALL_ERRORS.values())
    # Refused before sending: a TextgenError, and a ValueError, with no status code.
    assert issubclass(textgen.InvalidRequestError, TextgenError)
    assert issubclass(textgen.InvalidRequestError, ValueError)
    assert not issubclass(textgen.InvalidRequestError, APIStatusError)


@pytest.mark.parametrize("code", sorted(ALL_ERRORS, key=lambda c: c.name), ids=lambda c: c.name)
def test_each_status_from_the_server_maps_to_its_exception(
    client: Client, fake: FakeTextGeneration, code: grpc.StatusCode
) -> None:
    fake.fail(code, times=3)  # UNAVAILABLE is retried: max_retries=2 means three calls
    with pytest.raises(ALL_ERRORS[code]) as info:
        client.generate("Hi")
    assert (info.value.code, info.value.message) == (code, f"planned {code.name}")


def _status_bytes(*details: any_pb2.Any) -> bytes:
    return status_pb2.Status(code=3, message="bad", details=list(details)).SerializeToString()


def test_field_violations_are_parsed_from_the_status_details() -> None:
    bad_request = any_pb2.Any()
    bad_request.Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field="top_k", description="must be <= 50"),
                error_details_pb2.BadRequest.FieldViolation(
                    field="chat.messages[0].content", description="too long"
                ),
            ]
        )
    )
    other = any_pb2.Any()
    other.Pack(error_details_pb2.ErrorInfo(reason="X"))
    error = error_from_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        "bad",
        [("request-id", "abc"), ("grpc-status-details-bin", _status_bytes(other, bad_request))],
    )
    assert error.field_violations == [
        FieldViolation("top_k", "must be <= 50"),
        FieldViolation("chat.messages[0].content", "too long"),
    ]
    assert ("request-id", "abc") in error.trailing_metadata


def test_a_response_without_finish_reason_is_an_error() -> None:
    with pytest.raises(TextgenError, match="without a finish reason"):
        completion_from_proto(textgen_pb2.GenerateResponse(response="x"))


def test_undecodable_status_details_leave_no_violations() -> None:
    error = error_from_status(
        grpc.StatusCode.INVALID_ARGUMENT, "bad", [("grpc-status-details-bin", b"\xff\xff")]
    )
    assert (type(error), error.field_violations) == (InvalidArgumentError, [])


# -- Workers AI bodies --------------------------------------------------------------------------


def test_run_takes_the_prompt_form_verbatim(client: Client, fake: FakeTextGeneration) -> None:
    result = client.run(
        {"prompt": "Hello world", "raw": True, "max_tokens": 1, "temperature": 0.5, "lora": "pirate"}
    )
    assert isinstance(result, Completion)
    assert (result.response, result.finish_reason) == ("Hello", "length")
    request = fake.requests[-1]
    assert (request.prompt, request.raw, request.max_tokens, request.lora) == (
        "Hello world",
        True,
        1,
        "pirate",
    )
    assert not request.HasField("top_p")


def test_run_takes_the_messages_form_with_stream(client: Client, fake: FakeTextGeneration) -> None:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": "Hello there"}],
        "tools": [WEATHER_TOOL],
        "stream": True,
        "seed": 42,
    }
    result = client.run(body)
    assert isinstance(result, Stream)
    assert "".join(chunk.response for chunk in result) == "Hello there"
    request = fake.requests[-1]
    assert request.chat.tools[0].function.name == "get_weather"
    assert request.seed == 42


def test_run_without_stream_or_with_null_options(client: Client) -> None:
    result = client.run({"messages": [{"role": "user", "content": "Hi"}], "stream": False, "top_k": None})
    assert isinstance(result, Completion) and result.response == "Hi"


def _nested_objects(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "needs prompt or messages"),
        ({"prompt": "a", "messages": []}, "both prompt and messages"),
        ({"prompt": "a", "max_token": 3}, "unknown key(s) in the body: max_token"),
        ({"messages": [], "raw": True}, "unknown key(s) in the body: raw"),
        ({"prompt": "a", "stream": "yes"}, "stream: expected a boolean"),
        ({"prompt": "a", "max_tokens": "16"}, "max_tokens: "),
        ({"prompt": "a", "seed": 2**70}, "seed: "),
        ({"prompt": "a", "temperature": True}, "temperature: expected a number, got True"),
        ({"prompt": "a", "stop": 5}, "stop: expected a string or an array of strings"),
        ({"prompt": "a", "stop": ["x", 1]}, "stop[1]: expected a string"),
        ({"prompt": 5}, "prompt: "),
        ({"messages": "hi"}, "messages: expected an array"),
        ({"messages": [{"role": "user"}]}, "messages[0].content: required"),
        ({"messages": [{"role": "user", "content": 1}]}, "messages[0].content: expected a string"),
        (
            {"messages": [], "tools": [{"type": "function"}]},
            'tools[0]: expected {"type": "function", "function"',
        ),
        (
            {"messages": [], "tools": [{"fn": "f"}]},
            'or {"name": ..., "description": ..., "parameters": {...}}',
        ),
        ({"messages": [], "tools": [{"name": "f", "args": {}}]}, "tools[0]: unknown key(s) args; expected"),
        (
            {"messages": [], "tools": [{"type": "tool", "function": {"name": "f"}}]},
            'tools[0].type: expected "function"',
        ),
        ({"prompt": "a", "tool_choice": "auto"}, "unknown key(s) in the body: tool_choice"),
        ({"prompt": "a", "response_format": "json"}, "response_format: expected"),
        (
            {"prompt": "a", "response_format": {"type": "yaml"}},
            "response_format.type: expected 'json_object'",
        ),
        (
            {"prompt": "a", "response_format": {"type": "json_schema", "json_schema": []}},
            "response_format.json_schema: expected an object",
        ),
        ({"messages": [], "tool_choice": 3}, "tool_choice: expected 'auto', 'none', 'required'"),
        # A lone surrogate is no UTF-8: protobuf cannot hold it, wherever it is.
        ({"messages": [{"role": "user", "content": "a\ud800"}]}, "messages[0].content: "),
        ({"messages": [{"role": "user\udfff", "content": "a"}]}, "messages[0].role: "),
        ({"messages": [], "tools": [{"name": "f", "description": "\ud800"}]}, "tools[0].description: "),
        ({"messages": [], "tools": [{"function": {"name": "\ud800"}}]}, "tools[0].function.name: "),
        ({"messages": [], "tool_choice": "\ud800"}, "tool_choice: "),
        ({"prompt": "a", "stop": ["ok", "\ud800"]}, "stop[1]: "),
        ({"prompt": "a\ud800"}, "prompt: "),
        # A value of another type names the type the field takes.
        ({"prompt": 1}, "prompt: expected a string, got int"),
        ({"prompt": "a", "max_tokens": 1e30}, "max_tokens: expected an integer, got float"),
        ({"prompt": "a", "temperature": "hot"}, "temperature: expected a number, got str"),
        ({"prompt": "a", "lora": 5}, "lora: expected a string, got int"),
        (
            {"messages": [], "tools": [{"function": {"name": "f", "parameters": []}}]},
            "parameters: expected an object",
        ),
        # protobuf's own errors said neither what nor where ("bad argument type", a RecursionError).
        (
            {"prompt": "a", "response_format": {"type": "json_schema", "json_schema": {"enum": [{1: "x"}]}}},
            "response_format.json_schema: object keys must be strings, got 1",
        ),
        (
            {"messages": [], "tools": [{"name": "f", "parameters": _nested_objects(3000)}]},
            "tools[0].parameters: nests too deep to send",
        ),
    ],
)
def test_bodies_outside_the_card_are_refused_before_sending(body: dict[str, Any], message: str) -> None:
    with pytest.raises(textgen.InvalidRequestError) as info:
        request_from_body(body)
    assert message in str(info.value)


# -- the client object --------------------------------------------------------------------------


def test_the_context_manager_closes_the_channel(fake: FakeTextGeneration) -> None:
    with Client(fake.target) as client:
        client.generate("Hi")
    with pytest.raises(RuntimeError, match="the client is closed"):
        client.generate("Hi")


async def test_the_async_context_manager_closes_the_channel(fake: FakeTextGeneration) -> None:
    async with AsyncClient(fake.target) as client:
        await client.generate("Hi")
    with pytest.raises(RuntimeError, match="the client is closed"):
        await client.generate("Hi")


def test_an_async_client_made_outside_the_event_loop_works_inside_it(fake: FakeTextGeneration) -> None:
    client = AsyncClient(fake.target)  # the channel opens on first use, in asyncio.run's loop

    async def use() -> str:
        async with client:
            return (await client.generate("Hi there")).response

    assert asyncio.run(use()) == "Hi there"


def test_one_client_serves_many_threads(client: Client) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda i: client.generate(f"n {i}").response, range(32)))
    assert responses == [f"n {i}" for i in range(32)]


@pytest.mark.parametrize(
    "settings",
    [
        {"timeout": 0},
        {"timeout": -1.0},
        {"timeout": float("nan")},
        {"timeout": -math.inf},
        {"timeout": 1e10},  # grpc ended such a call at once, DEADLINE_EXCEEDED
        {"max_retries": -1},
    ],
)
def test_bad_client_settings_are_refused(settings: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Client(**settings)


def test_an_infinite_timeout_is_no_deadline(fake: FakeTextGeneration) -> None:
    with Client(fake.target, timeout=math.inf) as client:
        assert client.timeout is None and client.generate("Hi").response


def test_the_sdk_imports_only_grpc_and_protobuf() -> None:
    code = textwrap.dedent(
        """
        import sys
        import textgen, textgen.cli
        heavy = [m for m in ("numpy", "textgen_server", "grpc_status", "google.rpc") if m in sys.modules]
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=_env())
    assert (ROOT / "sdk" / "textgen" / "py.typed").is_file()


TYPED_USAGE = """
from typing import assert_type
import textgen

def check(client: textgen.Client, aclient: textgen.AsyncClient, flag: bool) -> None:
    assert_type(client.generate("hi"), textgen.Completion)
    assert_type(client.generate("hi", stream=True), textgen.Stream)
    assert_type(client.generate("hi", stream=flag), textgen.Completion | textgen.Stream)
    assert_type(client.chat([{"role": "user", "content": "hi"}], stream=True), textgen.Stream)
    assert_type(client.run({"prompt": "hi"}), textgen.Completion | textgen.Stream)
    for chunk in client.generate("hi", stream=True):
        assert_type(chunk, textgen.Chunk)

async def acheck(aclient: textgen.AsyncClient) -> None:
    assert_type(await aclient.generate("hi"), textgen.Completion)
    assert_type(await aclient.chat([{"role": "user", "content": "hi"}]), textgen.Completion)
    async for chunk in await aclient.generate("hi", stream=True):
        assert_type(chunk, textgen.Chunk)
    assert_type(await aclient.model_info(), textgen.ModelInfo)
"""


def test_mypy_strict_passes_on_the_sdk_and_its_overloads(tmp_path: Path) -> None:
    usage = tmp_path / "typed_usage.py"
    usage.write_text(TYPED_USAGE)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "sdk/textgen", str(usage)],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "sdk")}
