"""Between Python values and the textgen.v1 messages: requests from keyword arguments or from a
Workers AI request body, results from responses. No I/O here; both clients share it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from google.protobuf import json_format, struct_pb2
from google.protobuf.descriptor import FieldDescriptor

from ._exceptions import InvalidRequestError, TextgenError
from ._types import (
    Chunk,
    Completion,
    FinishReason,
    FlatTool,
    Message,
    ModelInfo,
    ResponseFormat,
    Token,
    Tool,
    ToolCall,
    Usage,
)
from .v1 import textgen_pb2

__all__ = [
    "SAMPLING_FIELDS",
    "build_request",
    "chunk_from_proto",
    "completion_from_proto",
    "dict_to_struct",
    "model_info_from_proto",
    "request_from_body",
    "struct_to_dict",
    "tool_from_json",
]

SAMPLING_FIELDS: Final = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
)
"""The card's sampling fields: proto3 `optional`, so a field left unset takes the server default."""

# The keys of the card's two request forms (plus `stop`, `response_format` and `tool_choice`,
# extensions of this API).
_COMMON_KEYS: Final = frozenset({"stream", "lora", "stop", "response_format", *SAMPLING_FIELDS})
_PROMPT_KEYS: Final = frozenset({"prompt", "raw"}) | _COMMON_KEYS
_MESSAGES_KEYS: Final = frozenset({"messages", "tools", "tool_choice"}) | _COMMON_KEYS
_TOOL_SHAPES: Final = (
    '{"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}} '
    'or {"name": ..., "description": ..., "parameters": {...}}'
)
_RESPONSE_FORMAT_SHAPES: Final = '{"type": "json_object"} or {"type": "json_schema", "json_schema": {...}}'

_FINISH_REASONS: Final[dict[int, FinishReason]] = {
    textgen_pb2.FINISH_REASON_STOP: "stop",
    textgen_pb2.FINISH_REASON_LENGTH: "length",
}


def build_request(
    *,
    prompt: str | None = None,
    messages: Iterable[Mapping[str, Any]] | None = None,
    tools: Iterable[Mapping[str, Any]] | None = None,
    tool_choice: str | None = None,
    response_format: Mapping[str, Any] | None = None,
    raw: bool = False,
    lora: str | None = None,
    stop: str | Sequence[str] | None = None,
    **sampling: float | None,
) -> textgen_pb2.GenerateRequest:
    """A GenerateRequest with exactly one of `prompt` or `messages`. Sampling values that are None
    stay unset. Tools may be in the card's form or the flat one; they are sent in the card's.
    Raises InvalidRequestError naming the field for a value it cannot hold."""
    request = textgen_pb2.GenerateRequest()
    if prompt is not None and messages is None:
        _set(request, "prompt", prompt)
        _set(request, "raw", raw)
        if tools is not None or tool_choice is not None:
            raise InvalidRequestError("tools and tool_choice apply to messages, not to a prompt")
    elif messages is not None and prompt is None:
        request.chat.SetInParent()  # an empty message list is still the chat form
        request.chat.messages.extend(_message(m, f"messages[{i}]") for i, m in enumerate(messages))
        if isinstance(tools, (str, bytes, Mapping)) or (
            tools is not None and not isinstance(tools, Iterable)
        ):
            raise InvalidRequestError(f"tools: expected an array of {_TOOL_SHAPES}")
        request.chat.tools.extend(tool_from_json(t, f"tools[{i}]") for i, t in enumerate(tools or ()))
        if tool_choice is not None:
            if not isinstance(tool_choice, str):
                raise InvalidRequestError(
                    f"tool_choice: expected 'auto', 'none', 'required' or a function's name, got {tool_choice!r}"
                )
            _set(request.chat, "tool_choice", tool_choice)
    else:
        raise InvalidRequestError("give exactly one of prompt or messages")
    if response_format is not None:
        request.response_format.CopyFrom(_response_format(response_format))
    if lora:
        _set(request, "lora", lora)
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if isinstance(stops, (bytes, Mapping)) or not isinstance(stops, Iterable):
            raise InvalidRequestError("stop: expected a string or an array of strings")
        for i, text in enumerate(stops):
            if not isinstance(text, str):
                raise InvalidRequestError(f"stop[{i}]: expected a string")
            try:
                request.stop.append(text)
            except ValueError as exc:  # not UTF-8: a lone surrogate
                raise InvalidRequestError(f"stop[{i}]: {exc}") from exc
    for name, value in sampling.items():
        if name not in SAMPLING_FIELDS:
            raise TypeError(f"unexpected sampling argument {name!r}")
        if isinstance(value, bool):  # a bool is an int to Python, not a number to JSON
            raise InvalidRequestError(f"{name}: expected a number, got {value!r}")
        if value is not None:
            _set(request, name, value)
    return request


def request_from_body(body: Mapping[str, Any]) -> tuple[textgen_pb2.GenerateRequest, bool]:
    """The request for a Workers AI request body, verbatim: the prompt form
    {"prompt", "raw", "lora", sampling...} or the messages form {"messages", "tools",
    "tool_choice", sampling...}, either with "stream" and "response_format". Returns (request,
    stream). A null value counts as absent; an unknown key raises InvalidRequestError (a misspelt
    option would otherwise be dropped without a word)."""
    if not isinstance(body, Mapping):
        raise InvalidRequestError(f"the body must be a JSON object, not {type(body).__name__}")
    values = {key: value for key, value in body.items() if value is not None}
    if "prompt" in values and "messages" in values:
        raise InvalidRequestError("the body has both prompt and messages; give one")
    if "prompt" in values:
        allowed = _PROMPT_KEYS
    elif "messages" in values:
        allowed = _MESSAGES_KEYS
    else:
        raise InvalidRequestError("the body needs prompt or messages")
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise InvalidRequestError(f"unknown key(s) in the body: {', '.join(unknown)}")
    stream = values.pop("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequestError(f"stream: expected a boolean, got {stream!r}")
    messages = values.pop("messages", None)
    tools = values.pop("tools", None)
    response_format = values.pop("response_format", None)
    if response_format is not None and not isinstance(response_format, Mapping):
        raise InvalidRequestError(f"response_format: expected {_RESPONSE_FORMAT_SHAPES}")
    for name, value in (("messages", messages), ("tools", tools)):
        if value is not None and (
            isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable)
        ):
            raise InvalidRequestError(f"{name}: expected an array")
    raw = values.pop("raw", False)
    if not isinstance(raw, bool):
        raise InvalidRequestError(f"raw: expected a boolean, got {raw!r}")
    request = build_request(
        prompt=values.pop("prompt", None),
        messages=messages,
        tools=tools,
        tool_choice=values.pop("tool_choice", None),
        response_format=response_format,
        raw=raw,
        lora=values.pop("lora", None),
        stop=values.pop("stop", None),
        **values,
    )
    return request, stream


def completion_from_proto(
    response: textgen_pb2.GenerateResponse, request_id: str | None = None
) -> Completion:
    finish_reason = _FINISH_REASONS.get(response.finish_reason)
    if finish_reason is None:
        raise TextgenError(f"the server sent a response without a finish reason ({response.finish_reason})")
    return Completion(
        response=response.response,
        tool_calls=_tool_calls(response.tool_calls),
        usage=_usage(response.usage),
        finish_reason=finish_reason,
        request_id=request_id,
    )


def chunk_from_proto(message: textgen_pb2.GenerateStreamResponse) -> Chunk:
    token = message.token
    return Chunk(
        response=message.response,
        token=Token(id=token.id, text=token.text, special=token.special)
        if message.HasField("token")
        else None,
        finish_reason=_FINISH_REASONS.get(message.finish_reason),
        usage=_usage(message.usage) if message.HasField("usage") else None,
        tool_calls=_tool_calls(message.tool_calls),
    )


def model_info_from_proto(response: textgen_pb2.GetModelInfoResponse) -> ModelInfo:
    return ModelInfo(
        model=response.model,
        dtype=response.dtype,
        execution_provider=response.execution_provider,
        max_input_length=response.max_input_length,
        max_total_tokens=response.max_total_tokens,
        max_batch_prefill_tokens=response.max_batch_prefill_tokens,
        vocab_size=response.vocab_size,
        adapters=list(response.adapters),
        kv_slots=response.kv_slots,
        kv_cache_bytes=response.kv_cache_bytes,
        weight_dtype=response.weight_dtype,
    )


def dict_to_struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    """A JSON object as a google.protobuf.Struct; ValueError saying why where it cannot be one
    (protobuf's own errors, a bare RecursionError or "bad argument type", say nothing of where)."""
    struct = struct_pb2.Struct()
    try:
        struct.update(value)
    except RecursionError:
        raise ValueError(
            "nests too deep to send (the server decodes 100 levels of protobuf, 3 a JSON object)"
        ) from None
    except TypeError as exc:
        key = _key_not_a_string(value)
        if key is None:
            raise
        raise ValueError(f"object keys must be strings, got {key!r}") from exc
    return struct


def _key_not_a_string(value: Any) -> object | None:
    """The first key of an object within `value` that is not a string (walked without recursion:
    `value` may nest deeper than Python's stack)."""
    pending: list[Any] = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, Mapping):
            for key, inner in item.items():
                if not isinstance(key, str):
                    found: object = key
                    return found
                pending.append(inner)
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return None


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A google.protobuf.Struct as the JSON object it holds. Struct keeps every number as a double;
    whole numbers come back as int, as a JSON parser would give them (3, not 3.0)."""
    return {key: _whole_numbers_as_int(value) for key, value in json_format.MessageToDict(struct).items()}


def _whole_numbers_as_int(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    if isinstance(value, dict):
        return {key: _whole_numbers_as_int(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_whole_numbers_as_int(item) for item in value]
    return value


def _tool_calls(calls: Iterable[textgen_pb2.ToolCall]) -> list[ToolCall]:
    return [ToolCall(name=call.name, arguments=struct_to_dict(call.arguments)) for call in calls]


def _usage(usage: textgen_pb2.Usage) -> Usage:
    return Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


_KINDS: Final = {
    FieldDescriptor.TYPE_STRING: "a string",
    FieldDescriptor.TYPE_BOOL: "a boolean",
    FieldDescriptor.TYPE_DOUBLE: "a number",
    FieldDescriptor.TYPE_FLOAT: "a number",
    FieldDescriptor.TYPE_INT32: "an integer",
    FieldDescriptor.TYPE_INT64: "an integer",
    FieldDescriptor.TYPE_UINT32: "an integer",
    FieldDescriptor.TYPE_UINT64: "an integer",
}


def _set(message: Any, name: str, value: object, where: str | None = None) -> None:
    """`message.name = value`, or InvalidRequestError naming the field (`where`, default `name`):
    a value of another type, or one protobuf cannot hold (an integer out of range, a string with a
    lone surrogate, which is not UTF-8)."""
    try:
        setattr(message, name, value)
    except TypeError as exc:
        kind = _KINDS.get(message.DESCRIPTOR.fields_by_name[name].type)
        if kind is None:
            raise InvalidRequestError(f"{where or name}: {exc}") from exc
        raise InvalidRequestError(f"{where or name}: expected {kind}, got {type(value).__name__}") from exc
    except ValueError as exc:
        raise InvalidRequestError(f"{where or name}: {exc}") from exc


def _object(value: object, where: str, required: Iterable[str], optional: Iterable[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidRequestError(f"{where}: expected an object, got {type(value).__name__}")
    unknown = sorted(set(value) - set(required) - set(optional))
    if unknown:
        raise InvalidRequestError(f"{where}: unknown key(s) {', '.join(unknown)}")
    for key in required:
        if key not in value:
            raise InvalidRequestError(f"{where}.{key}: required")
    return value


def _message(value: Message | Mapping[str, Any], where: str) -> textgen_pb2.Message:
    fields = _object(value, where, ("role", "content"), ("name",))
    message = textgen_pb2.Message()
    for key in ("role", "content", "name"):
        if key in fields:
            if not isinstance(fields[key], str):
                raise InvalidRequestError(f"{where}.{key}: expected a string")
            _set(message, key, fields[key], f"{where}.{key}")
    return message


def tool_from_json(value: Tool | FlatTool | Mapping[str, Any], where: str = "tool") -> textgen_pb2.Tool:
    """A tool in the card's form {"type": "function", "function": {...}} or the flat form
    {"name", "description", "parameters"}, as the card's form. A wrong shape raises
    InvalidRequestError showing the shapes expected."""
    if not isinstance(value, Mapping) or not ("function" in value or "name" in value):
        got = (
            f"an object with keys {', '.join(sorted(value)) or '(none)'}"
            if isinstance(value, Mapping)
            else (type(value).__name__)
        )
        raise InvalidRequestError(f"{where}: expected {_TOOL_SHAPES}, got {got}")
    if "function" in value:
        fields = _shaped(value, where, ("function",), ("type",))
        if "type" in fields and fields["type"] != "function":
            raise InvalidRequestError(f'{where}.type: expected "function", got {fields["type"]!r}')
        where += ".function"
        function = fields["function"]
        if not isinstance(function, Mapping):
            raise InvalidRequestError(
                f'{where}: expected {{"name": ..., "description": ..., "parameters": {{...}}}}'
            )
    else:
        function = value
    function = _shaped(function, where, ("name",), ("description", "parameters"))
    tool = textgen_pb2.Tool(type="function")
    for key in ("name", "description"):
        if key in function:
            if not isinstance(function[key], str):
                raise InvalidRequestError(f"{where}.{key}: expected a string")
            _set(tool.function, key, function[key], f"{where}.{key}")
    parameters = function.get("parameters")
    if parameters is not None:
        if not isinstance(parameters, Mapping):
            raise InvalidRequestError(f"{where}.parameters: expected an object (a JSON Schema)")
        try:
            tool.function.parameters.CopyFrom(dict_to_struct(parameters))
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(f"{where}.parameters: {exc}") from exc
    return tool


def _shaped(
    value: Mapping[str, Any], where: str, required: Iterable[str], optional: Iterable[str]
) -> Mapping[str, Any]:
    """`_object` for a tool: its errors show the shapes expected."""
    try:
        return _object(value, where, required, optional)
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"{exc}; expected {_TOOL_SHAPES}") from exc


def _response_format(value: ResponseFormat | Mapping[str, Any]) -> textgen_pb2.ResponseFormat:
    fields = _object(value, "response_format", ("type",), ("json_schema",))
    if fields["type"] not in ("json_object", "json_schema"):
        raise InvalidRequestError(
            f"response_format.type: expected 'json_object' or 'json_schema', got {fields['type']!r}"
        )
    response_format = textgen_pb2.ResponseFormat(type=fields["type"])
    schema = fields.get("json_schema")
    if schema is not None:
        if not isinstance(schema, Mapping):
            raise InvalidRequestError("response_format.json_schema: expected an object (a JSON Schema)")
        try:
            response_format.json_schema.CopyFrom(dict_to_struct(schema))
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(f"response_format.json_schema: {exc}") from exc
    return response_format
