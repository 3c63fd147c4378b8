"""Undecodable requests: INVALID_ARGUMENT naming the field and the reason, for every RPC (issue 14, cause 3).

protobuf itself is the reference: a request is undecodable exactly when `FromString` raises, and
`diagnose` must then name where. The live server is called with raw bytes through a generic
channel call, since a stub cannot send a corrupt message.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from fuzz_cases import put_string, string_fields
from google.protobuf import message_factory, struct_pb2
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status
from server_harness import ServerThread
from textgen.v1 import textgen_pb2 as pb
from textgen_server import decoding
from textgen_server.decoding import MAX_DEPTH, diagnose

MARK = "\u00e9@"  # two characters, three bytes: replaced in the encoding by three bytes of invalid UTF-8
BAD_UTF8 = b"\xc3\x28\xff"  # a lead byte without its continuation, then a byte UTF-8 never uses


def _with_mark(path: str) -> pb.GenerateRequest:
    """A request whose only marked string is the one at `path`."""
    request = pb.GenerateRequest(prompt="Hi", max_tokens=2)
    put_string(request, path, MARK)
    return request


STRING_FIELDS = sorted(string_fields())


def _corrupt(request: pb.GenerateRequest) -> bytes:
    data = request.SerializeToString()
    assert data.count(MARK.encode()) == 1
    return data.replace(MARK.encode(), BAD_UTF8)


def _nested(depth: int) -> pb.GenerateRequest:
    """A chat request whose tool parameters nest `depth` JSON objects inside each other."""
    request = pb.GenerateRequest(max_tokens=2)
    request.chat.messages.add(role="user", content="Hi")
    parameters: struct_pb2.Struct = request.chat.tools.add(type="function").function.parameters
    for _ in range(depth):
        parameters = parameters.fields["a"].struct_value
    return request


def _undecodable(descriptor: Descriptor, data: bytes) -> DecodeError | None:
    try:
        message_factory.GetMessageClass(descriptor).FromString(data)
    except DecodeError as error:
        return error
    return None


def test_every_string_field_is_covered() -> None:
    # Read from the descriptor: a string field the proto gains is fuzzed without a word here.
    known = {"prompt", "lora", "stop[0]", "chat.messages[0].role", "chat.tools[0].function.parameters"}
    assert known <= set(STRING_FIELDS) and len(STRING_FIELDS) >= 16, STRING_FIELDS
    for path in STRING_FIELDS:
        assert _with_mark(path).SerializeToString().count(MARK.encode()) == 1, path


@pytest.mark.parametrize("path", STRING_FIELDS)
def test_invalid_utf8_is_found_in_its_field(path: str) -> None:
    data = _corrupt(_with_mark(path))
    error = _undecodable(pb.GenerateRequest.DESCRIPTOR, data)
    assert error is not None, "protobuf accepted invalid UTF-8"
    violation = diagnose(pb.GenerateRequest.DESCRIPTOR, data, error)
    assert violation.field == path
    assert "not valid UTF-8" in violation.description


@pytest.mark.parametrize("depth", range(MAX_DEPTH // 3 - 6, MAX_DEPTH // 3 + 6))
def test_depth_limit_is_protobufs_own(depth: int) -> None:
    data = _nested(depth).SerializeToString()
    error = _undecodable(pb.GenerateRequest.DESCRIPTOR, data)
    if error is None:
        return  # within the limit: nothing to diagnose
    violation = diagnose(pb.GenerateRequest.DESCRIPTOR, data, error)
    assert violation.field == "chat.tools[0].function.parameters"
    assert f"more than {MAX_DEPTH} messages deep" in violation.description


def test_depth_limit_is_reached_in_that_range() -> None:
    """The parametrized range straddles protobuf's limit, so both sides are exercised."""
    assert (
        _undecodable(pb.GenerateRequest.DESCRIPTOR, _nested(MAX_DEPTH // 3 - 6).SerializeToString()) is None
    )
    assert _undecodable(pb.GenerateRequest.DESCRIPTOR, _nested(MAX_DEPTH // 3 + 5).SerializeToString())


def test_every_truncation_is_located() -> None:
    request = _with_mark("chat.tools[0].function.parameters")
    request.temperature = 0.5
    data = request.SerializeToString()
    located = 0
    for cut in range(len(data)):
        error = _undecodable(pb.GenerateRequest.DESCRIPTOR, data[:cut])
        if error is None:
            continue  # cut between fields: a shorter, valid request
        violation = diagnose(pb.GenerateRequest.DESCRIPTOR, data[:cut], error)
        assert "truncated or corrupt" in violation.description, violation
        located += 1
    assert located > len(data) // 2


# -- through the live server ------------------------------------------------------------------------


def _call(channel: grpc.Channel, method: str, data: bytes, streaming: bool = False) -> grpc.RpcError:
    if streaming:
        with pytest.raises(grpc.RpcError) as caught:
            list(channel.unary_stream(method)(data, timeout=30))
    else:
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary(method)(data, timeout=30)
    return caught.value


def _violations(error: grpc.RpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.BadRequest detail"
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    return {v.field: v.description for v in bad.field_violations}


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as channel:
        yield channel


@pytest.mark.parametrize("streaming", [False, True], ids=["Generate", "GenerateStream"])
@pytest.mark.parametrize("path", STRING_FIELDS)
def test_server_names_the_field_with_invalid_utf8(channel: grpc.Channel, path: str, streaming: bool) -> None:
    method = "/textgen.v1.TextGeneration/" + ("GenerateStream" if streaming else "Generate")
    error = _call(channel, method, _corrupt(_with_mark(path)), streaming)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "not valid UTF-8" in _violations(error)[path]


def test_the_field_is_found_off_the_event_loop(
    channel: grpc.Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Walking a request's fields took 0.35 s for 260,000 strings (1 MB): on the event loop, every
    stream's tokens waited for it."""
    threads: list[str] = []
    real_diagnose = decoding.diagnose

    def diagnose_recording_thread(*args: Any) -> Any:
        try:
            asyncio.get_running_loop()
            threads.append("an event loop's")
        except RuntimeError:
            threads.append(threading.current_thread().name)
        return real_diagnose(*args)

    monkeypatch.setattr(decoding, "diagnose", diagnose_recording_thread)
    error = _call(channel, "/textgen.v1.TextGeneration/Generate", _corrupt(_with_mark("prompt")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not valid UTF-8" in _violations(error)["prompt"]
    assert len(threads) == 1 and threads[0].startswith("textgen-diagnose"), threads


def test_server_refuses_truncated_and_deep_requests(channel: grpc.Channel) -> None:
    data = pb.GenerateRequest(prompt="Hello there", max_tokens=2).SerializeToString()
    error = _call(channel, "/textgen.v1.TextGeneration/Generate", data[:-3])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "truncated or corrupt" in (error.details() or "")
    error = _call(channel, "/textgen.v1.TextGeneration/Generate", _nested(40).SerializeToString())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "chat.tools[0].function.parameters" in _violations(error)


def test_get_model_info_and_health_refuse_corrupt_bytes(channel: grpc.Channel) -> None:
    for method in ("/textgen.v1.TextGeneration/GetModelInfo", "/grpc.health.v1.Health/Check"):
        error = _call(channel, method, b"\x0a\x05ab")  # a length-delimited field cut short
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error.details())
        assert "truncated or corrupt" in (error.details() or "")
    # Unknown fields are not errors: GetModelInfo still answers.
    assert channel.unary_unary("/textgen.v1.TextGeneration/GetModelInfo")(b"\x0a\x02ab", timeout=30)
    bad_service = (
        health_pb2.HealthCheckRequest(service=MARK).SerializeToString().replace(MARK.encode(), BAD_UTF8)
    )
    error = _call(channel, "/grpc.health.v1.Health/Check", bad_service)
    assert _violations(error) == {"service": "is not valid UTF-8 (invalid byte at offset 0)"}
    # Watch streams with context.write, not as an async generator: it was UNKNOWN and a traceback.
    error = _call(channel, "/grpc.health.v1.Health/Watch", b"\x0a\x05ab", streaming=True)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "truncated or corrupt" in (
        error.details() or ""
    )
    error = _call(channel, "/grpc.health.v1.Health/Watch", bad_service, streaming=True)
    assert _violations(error) == {"service": "is not valid UTF-8 (invalid byte at offset 0)"}


def test_reflection_refuses_corrupt_bytes_and_still_answers(channel: grpc.Channel) -> None:
    from grpc_reflection.v1alpha import reflection_pb2

    method = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    call = channel.stream_stream(method)
    with pytest.raises(grpc.RpcError) as caught:  # it was UNKNOWN and a traceback in the log
        list(call(iter([b"\x0a\x05ab"]), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "truncated or corrupt" in (caught.value.details() or "")
    listing = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
    [answer] = call(iter([listing]), timeout=30)
    services = reflection_pb2.ServerReflectionResponse.FromString(answer).list_services_response.service
    assert "textgen.v1.TextGeneration" in {service.name for service in services}


def test_refusals_are_counted(server: ServerThread, channel: grpc.Channel) -> None:
    rejected = server.server.metrics.request_failure.labels("INVALID_ARGUMENT")
    before = rejected._value.get()
    _call(channel, "/textgen.v1.TextGeneration/Generate", b"\xff")
    assert rejected._value.get() == before + 1
