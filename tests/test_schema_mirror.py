"""The proto mirrors the Workers AI card's JSON schemas, and the server enforces every bound in them.

Read mechanically from the card's own schemas (copied into tests/data): a property added to the
card without a field here, or a bound the server forgets, fails this test.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from textgen.v1 import textgen_pb2 as pb
from textgen.v1 import textgen_pb2_grpc as rpc

DATA = Path(__file__).parent / "data"
INPUT_SCHEMA = json.loads((DATA / "input.schema.json").read_text())
OUTPUT_SCHEMA = json.loads((DATA / "output.schema.json").read_text())

# Where a card property lives when it is not a field of the same name on the same message.
RELOCATED = {
    ("GenerateRequest", "messages"): ("chat", "messages"),
    ("GenerateRequest", "tools"): ("chat", "tools"),
}
# `stream` chooses the RPC (Generate or GenerateStream) instead of being a field.
RPC_CHOICE = {("GenerateRequest", "stream")}
SCALAR_TYPES = {
    "string": {FieldDescriptor.TYPE_STRING},
    "boolean": {FieldDescriptor.TYPE_BOOL},
    "integer": {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
    },
    "number": {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT},
}
INT32_MAX = 2**31 - 1


def _card_properties(schema: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for branch in schema["oneOf"]:
        yield from branch.get("properties", {}).items()


def _field(message: Descriptor, name: str) -> tuple[Descriptor, FieldDescriptor]:
    path = RELOCATED.get((message.name, name), (name,))
    for step in path[:-1]:
        message = message.fields_by_name[step].message_type
    assert path[-1] in message.fields_by_name, f"{message.full_name} has no field for the card's {name!r}"
    return message, message.fields_by_name[path[-1]]


def _check(schema: dict[str, Any], field: FieldDescriptor, where: str) -> int:
    """Assert that `field` can carry what `schema` describes; returns how many properties were checked."""
    kind = schema.get("type")
    if kind == "array":
        assert field.is_repeated, f"{where}: the card has an array"
        return _check_value(schema["items"], field, where)
    assert not field.is_repeated, f"{where}: the card has a single {kind}"
    return _check_value(schema, field, where)


def _check_value(schema: dict[str, Any], field: FieldDescriptor, where: str) -> int:
    kind = schema.get("type")
    if kind == "object":
        assert field.type == FieldDescriptor.TYPE_MESSAGE, f"{where}: the card has an object"
        message = field.message_type
        if message.full_name == "google.protobuf.Struct":
            return 1  # any JSON object, e.g. a tool's parameters or a call's arguments
        return 1 + _check_object(schema, message, where)
    assert field.type in SCALAR_TYPES[kind], f"{where}: {kind} cannot be {field.type}"
    if kind == "integer" and schema.get("maximum", 0) > INT32_MAX:
        assert field.type in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64), (
            f"{where}: needs 64 bits"
        )
    if "default" in schema or "minimum" in schema:
        # Unset must differ from zero wherever the card has a default or zero is out of range.
        assert field.has_presence or kind == "boolean", f"{where}: should be proto3 optional"
    return 1


def _check_object(schema: dict[str, Any], message: Descriptor, where: str) -> int:
    checked = 0
    for name, prop in schema.get("properties", {}).items():
        _, field = _field(message, name)
        checked += _check(prop, field, f"{where}.{name}")
    return checked


def test_every_input_property_has_a_compatible_field() -> None:
    checked = 0
    names = set()
    for name, prop in _card_properties(INPUT_SCHEMA):
        names.add(name)
        if ("GenerateRequest", name) in RPC_CHOICE:
            service = pb.DESCRIPTOR.services_by_name["TextGeneration"]
            assert not service.methods_by_name["Generate"].server_streaming
            assert service.methods_by_name["GenerateStream"].server_streaming
            checked += 1
            continue
        _, field = _field(pb.GenerateRequest.DESCRIPTOR, name)
        checked += _check(prop, field, name)
    assert {"prompt", "messages", "tools", "seed", "lora", "raw", "stream"} <= names
    assert checked >= len(names)


def test_every_output_property_has_a_compatible_field() -> None:
    json_branch, stream_branch = OUTPUT_SCHEMA["oneOf"]
    assert _check_object(json_branch, pb.GenerateResponse.DESCRIPTOR, "output") == 4
    assert stream_branch["contentType"] == "text/event-stream"
    assert "response" in pb.GenerateStreamResponse.DESCRIPTOR.fields_by_name
    # Tool calls arrive whole on the last stream message, in the shape of the JSON output's.
    assert _check_object(json_branch, pb.GenerateStreamResponse.DESCRIPTOR, "stream") == 4


# `response_format` as newer revisions of the card (and of Workers AI's other text-generation
# cards) have it: {"type": "json_object" | "json_schema", "json_schema": <a JSON Schema>}.
NEWER_CARD_RESPONSE_FORMAT = {
    "type": "object",
    "properties": {"type": {"type": "string", "enum": ["json_object", "json_schema"]}, "json_schema": {}},
}


def test_response_format_mirrors_the_newer_card() -> None:
    field = pb.GenerateRequest.DESCRIPTOR.fields_by_name["response_format"]
    message = field.message_type
    assert (
        _check(NEWER_CARD_RESPONSE_FORMAT["properties"]["type"], message.fields_by_name["type"], "type") == 1
    )
    # "json_schema": {} is any JSON Schema: a Struct holds any JSON object.
    assert message.fields_by_name["json_schema"].message_type.full_name == "google.protobuf.Struct"
    assert set(message.fields_by_name) == set(NEWER_CARD_RESPONSE_FORMAT["properties"])


def test_card_bodies_are_valid_request_json() -> None:
    """A card prompt body parses as it is; a chat body needs only the `chat` wrapper."""
    body = {
        "prompt": "Hi",
        "max_tokens": 16,
        "temperature": 0.6,
        "seed": 9999999999,
        "raw": False,
        "lora": "",
    }
    request = json_format.ParseDict(body, pb.GenerateRequest())
    assert request.seed == 9999999999 and request.temperature == 0.6
    chat = {
        "messages": [{"role": "user", "content": "Hi"}],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "f",
                    "description": "d",
                    "parameters": {"type": "object", "properties": {}},
                },
            }
        ],
    }
    json_format.ParseDict({"chat": chat, "max_tokens": 3}, pb.GenerateRequest())
    # Extensions: the flat tool form, tool_choice, a tool result, and response_format (newer cards).
    flat = {"name": "f", "description": "d", "parameters": {"type": "object", "properties": {}}}
    extended = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": '{"name":"f","arguments":{}}'},
            {"role": "tool", "name": "f", "content": "42"},
        ],
        "tools": [flat],
        "tool_choice": "required",
    }
    request = json_format.ParseDict({"chat": extended}, pb.GenerateRequest())
    assert request.chat.tools[0].name == "f" and request.chat.messages[2].name == "f"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    for body in (
        {"prompt": "Hi", "response_format": {"type": "json_schema", "json_schema": schema}},
        {
            "chat": {"messages": [{"role": "user", "content": "Hi"}]},
            "response_format": {"type": "json_object"},
        },
    ):
        request = json_format.ParseDict(body, pb.GenerateRequest())
        assert request.response_format.type == body["response_format"]["type"]  # type: ignore[index]


# -- the bounds, enforced by the running server -------------------------------------------------


def _text(length: int) -> str:
    """`length` characters that tokenize compactly (one token per word), to stay within 3072 tokens."""
    return ("hello " * (length // 6 + 1))[:length]


def _bounded_properties() -> list[tuple[str, str, Any, Any]]:
    """(wire field for the violation, keyword, value at the bound, value just outside)."""
    cases: dict[tuple[str, str], tuple[str, str, Any, Any]] = {}
    for name, prop in _card_properties(INPUT_SCHEMA):
        targets = [(name, prop)]
        if name == "messages":
            targets = [("chat.messages[0].content", prop["items"]["properties"]["content"])]
        for field, spec in targets:
            step = 1 if spec.get("type") == "integer" else 0.01
            if "minimum" in spec:
                cases[(field, "minimum")] = (field, "minimum", spec["minimum"], spec["minimum"] - step)
            if "maximum" in spec:
                cases[(field, "maximum")] = (field, "maximum", spec["maximum"], spec["maximum"] + step)
            if "minLength" in spec:
                cases[(field, "minLength")] = (
                    field,
                    "minLength",
                    _text(spec["minLength"]),
                    _text(spec["minLength"] - 1),
                )
            if "maxLength" in spec:
                cases[(field, "maxLength")] = (
                    field,
                    "maxLength",
                    _text(spec["maxLength"]),
                    _text(spec["maxLength"] + 1),
                )
    return sorted(cases.values(), key=str)


BOUNDS = _bounded_properties()


def _request(field: str, value: Any) -> pb.GenerateRequest:
    if field == "chat.messages[0].content":
        return pb.GenerateRequest(
            chat=pb.Chat(messages=[pb.Message(role="user", content=value)]), max_tokens=1
        )
    if field == "prompt":
        return pb.GenerateRequest(prompt=value, raw=True, max_tokens=1)
    return json_format.ParseDict({"prompt": "Hi", "max_tokens": 1, field: value}, pb.GenerateRequest())


def test_bounds_cover_the_card() -> None:
    fields = {field for field, *_ in BOUNDS}
    assert fields == {
        "prompt",
        "chat.messages[0].content",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "repetition_penalty",
        "frequency_penalty",
        "presence_penalty",
    }
    assert len(BOUNDS) == 2 + 1 + 7 * 2


@pytest.mark.parametrize(
    ("field", "keyword", "inside", "outside"), BOUNDS, ids=[f"{f}-{k}" for f, k, *_ in BOUNDS]
)
def test_server_enforces_bound(
    stub: rpc.TextGenerationStub, field: str, keyword: str, inside: Any, outside: Any
) -> None:
    stub.Generate(_request(field, inside))  # at the bound: served
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(_request(field, outside))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert [v.field for v in bad.field_violations] == [field]
