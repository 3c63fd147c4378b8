"""Plain Python types of the textgen API: what the SDK takes and what it returns.

Results are frozen dataclasses built from the protobuf messages; inputs that mirror the Workers AI
card (`Message`, `Tool`, `ResponseFormat`) are TypedDicts, so the card's JSON bodies type-check as
they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias, TypedDict

__all__ = [
    "Chunk",
    "Completion",
    "FinishReason",
    "FlatTool",
    "Message",
    "ModelInfo",
    "ResponseFormat",
    "Token",
    "Tool",
    "ToolCall",
    "ToolChoice",
    "ToolFunction",
    "Usage",
]

FinishReason = Literal["stop", "length"]
"""Why generation ended: "stop" (end of sequence or a stop string) or "length" (max_tokens or the
model's max_total_tokens)."""


@dataclass(frozen=True)
class Usage:
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class ToolCall:
    """A function call the model asked for; `arguments` is the decoded JSON object."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Token:
    """The token a stream chunk was produced for."""

    id: int
    text: str
    special: bool


@dataclass(frozen=True)
class Completion:
    """A complete response: the card's `response` and `tool_calls`, plus usage and finish reason.
    `request_id` is the x-request-id the server logged the request under."""

    response: str
    tool_calls: list[ToolCall]
    usage: Usage
    finish_reason: FinishReason
    request_id: str | None = None


@dataclass(frozen=True)
class Chunk:
    """One message of a stream. The `response` deltas of a stream concatenate to the full text;
    `finish_reason`, `usage` and the `tool_calls` (whole, never as text) are set on the last chunk
    only."""

    response: str
    token: Token | None
    finish_reason: FinishReason | None
    usage: Usage | None
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class ModelInfo:
    """The served model: its name, limits, dtype, execution provider, LoRA adapters and KV cache."""

    model: str
    dtype: str
    execution_provider: str
    max_input_length: int
    max_total_tokens: int
    max_batch_prefill_tokens: int
    vocab_size: int
    adapters: list[str]
    kv_slots: int = 0  # sequences decoded together
    kv_cache_bytes: int = 0  # the KV cache, allocated once at start-up
    weight_dtype: str = ""  # fp32, fp16, int4 or int8; `dtype` is the activations' and the cache's


class _MessageOptional(TypedDict, total=False):
    name: str
    """A "tool" message: the function whose result it carries (by default its call's)."""


class Message(_MessageOptional):
    """One chat turn, as in the card: role is "system", "user" or "assistant", or "tool" for the
    result of a call (after an "assistant" message whose content is the call's JSON, as Workers AI's
    runWithTools sends it)."""

    role: str
    content: str


class _ToolFunctionOptional(TypedDict, total=False):
    description: str
    parameters: Mapping[str, Any]
    """A JSON Schema object: {"type": "object", "properties": {...}, "required": [...]}."""


class ToolFunction(_ToolFunctionOptional):
    """The function a tool offers: its name, and optionally a description and JSON Schema."""

    name: str


class Tool(TypedDict):
    """A tool the model may call, as in the card: {"type": "function", "function": {...}}."""

    type: str
    function: ToolFunction


class FlatTool(_ToolFunctionOptional):
    """A tool in the flat form, which Workers AI also accepts: {"name", "description", "parameters"}."""

    name: str


ToolChoice: TypeAlias = Literal["auto", "none", "required"] | str
""""auto" (text or calls), "none" (text), "required" (one or more calls), or a function's name."""


class _ResponseFormatOptional(TypedDict, total=False):
    json_schema: Mapping[str, Any]
    """With type "json_schema": the JSON Schema the response matches."""


class ResponseFormat(_ResponseFormatOptional):
    """JSON mode: {"type": "json_object"} for any JSON object, or {"type": "json_schema",
    "json_schema": {...}} for an object matching the schema."""

    type: Literal["json_object", "json_schema"]
