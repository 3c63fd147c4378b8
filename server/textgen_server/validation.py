"""A wire request → a typed GenerationRequest, or every field violation at once.

The bounds are the Workers AI card's (its JSON schema is the source; a test checks that each
minimum, maximum, minLength and maxLength there is enforced here). Token limits come from the
model directory's config. Tools and `response_format` are compiled into the request's grammar here,
so that a schema llguidance cannot compile fails this request alone, naming the field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format, struct_pb2
from textgen.v1 import textgen_pb2 as pb

from .adapters import unknown_adapter_message
from .excerpt import excerpt, excerpt_list, number
from .generation import GenerationRequest
from .grammar import GrammarCompiler, GrammarError, OutputConstraint
from .model_config import ModelConfig
from .prompt import ChatMessage, PromptError, encode_chat, encode_prompt
from .sampling import PENALTY_MAX, SEED_MAX, SEED_MIN, TEMPERATURE_MAX, TOP_K_MAX, TOP_P_MAX, SamplingParams
from .stopping import MAX_STOP_SEQUENCES
from .tokenizer import Tokenizer
from .tools import ToolChoice, ToolChoiceMode, ToolSpec, dumps, tools_prompt

MAX_PROMPT_CHARS = 6144
MAX_CONTENT_CHARS = 6144
MAX_REPORTED_VIOLATIONS = 8
MAX_STOP_CHARS = 256
DEFAULT_MAX_TOKENS = 256
MAX_SCHEMA_CHARS = 32768  # response_format.json_schema as compact JSON (compiling it blocks the caller)
# The most protobuf bytes a character of a Struct's compact JSON takes: a one-digit number in a list
# is 11 bytes (tag, length, tag, an 8-byte double) to JSON's "1,". Structs over this many bytes per
# character allowed are refused unconverted: converting a megabyte held the event loop for 100 ms.
STRUCT_BYTES_PER_JSON_CHAR = 6
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
RESPONSE_FORMATS = ("json_object", "json_schema")

# field: (minimum, maximum), both inclusive: the card's schema bounds, as sampling defines them.
NUMBER_BOUNDS: dict[str, tuple[float, float]] = {
    "temperature": (0.0, TEMPERATURE_MAX),
    "top_p": (0.0, TOP_P_MAX),
    "repetition_penalty": (0.0, PENALTY_MAX),
    "frequency_penalty": (0.0, PENALTY_MAX),
    "presence_penalty": (0.0, PENALTY_MAX),
}
INTEGER_BOUNDS: dict[str, tuple[int, int]] = {
    "top_k": (1, TOP_K_MAX),
    "seed": (SEED_MIN, SEED_MAX),
}


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class InvalidRequestError(Exception):
    """INVALID_ARGUMENT, with one violation per offending field (the first few of them).

    A status travels in trailers of a few kilobytes: a request with 150 oversized messages reports
    the first MAX_REPORTED_VIOLATIONS and how many more there were, never all of them.
    """

    def __init__(self, violations: list[FieldViolation]) -> None:
        if len(violations) > MAX_REPORTED_VIOLATIONS:
            kept = violations[: MAX_REPORTED_VIOLATIONS - 1]
            last = violations[MAX_REPORTED_VIOLATIONS - 1]
            more = len(violations) - MAX_REPORTED_VIOLATIONS
            summary = FieldViolation(last.field, f"{last.description} (and {more} more violations)")
            violations = [*kept, summary]
        self.violations = violations
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))


class UnknownAdapterError(Exception):
    """NOT_FOUND: the request names a LoRA adapter this server does not have."""


class UnsupportedFeatureError(Exception):
    """UNIMPLEMENTED: tools or `response_format` on a scheduler given no grammar compiler (the
    server always loads one; tests build schedulers without it)."""


def build_request(
    message: pb.GenerateRequest,
    *,
    tokenizer: Tokenizer,
    config: ModelConfig,
    adapters: frozenset[str],
    request_id: str,
    grammars: GrammarCompiler | None = None,
) -> GenerationRequest:
    violations: list[FieldViolation] = []
    sampling = _sampling(message, violations)
    stop = _stop(message, violations)
    max_tokens = message.max_tokens if message.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    if max_tokens < 1:
        violations.append(FieldViolation("max_tokens", f"must be at least 1, got {max_tokens}"))
    output = _output(message, config.max_input_length * tokenizer.longest_piece, violations)
    prompt_ids = _prompt_ids(message, tokenizer, output, config.max_input_length, violations)
    if prompt_ids is not None:
        _check_token_limits(len(prompt_ids), max_tokens, config, violations)
    if violations:
        raise InvalidRequestError(violations)
    assert prompt_ids is not None  # no violations means the input was tokenized
    if message.lora and message.lora not in adapters:
        raise UnknownAdapterError(unknown_adapter_message(message.lora, adapters))
    return GenerationRequest(
        request_id=request_id,
        prompt_ids=tuple(prompt_ids),
        max_new_tokens=max_tokens,
        sampling=sampling,
        stop=stop,
        lora=message.lora or None,
        constraint=_constraint(output, grammars),
    )


@dataclass(frozen=True)
class _Output:
    """What the request asks the output to be: tool calls offered, or JSON (a schema; None: any object)."""

    tools: tuple[ToolSpec, ...] = ()
    tool_fields: tuple[str, ...] = ()  # where each tool sits in the request, for error messages
    choice: ToolChoice = field(default_factory=ToolChoice)
    json_mode: bool = False
    json_schema: Mapping[str, Any] | None = None

    @property
    def offers_tools(self) -> bool:
        return bool(self.choice.offered(self.tools))


def _output(message: pb.GenerateRequest, max_input_chars: int, violations: list[FieldViolation]) -> _Output:
    """`max_input_chars`: the most characters the input's tokens can hold (tools beyond are refused)."""
    tools: tuple[ToolSpec, ...] = ()
    fields: tuple[str, ...] = ()
    choice = ToolChoice()
    if message.WhichOneof("input") == "chat":
        tools, fields = _tools(message.chat, max_input_chars, violations)
        choice = _tool_choice(message.chat.tool_choice, tools, violations)
    if not message.HasField("response_format"):
        return _Output(tools, fields, choice)
    json_schema = _response_format(message.response_format, violations)
    if choice.offered(tools):
        violations.append(
            FieldViolation(
                "response_format",
                "cannot be combined with chat.tools unless chat.tool_choice is 'none': "
                "the answer is either JSON or tool calls",
            )
        )
    if message.stop:
        violations.append(
            FieldViolation(
                "stop", "cannot be combined with response_format: a stop string would cut the JSON short"
            )
        )
    return _Output(tools, fields, choice, json_mode=True, json_schema=json_schema)


def _tools(
    chat: pb.Chat, max_input_chars: int, violations: list[FieldViolation]
) -> tuple[tuple[ToolSpec, ...], tuple[str, ...]]:
    """The tools, in either form, and where each one sits ("chat.tools[0].function" or "chat.tools[0]").

    Parameters past what `max_input_chars` characters of JSON could take on the wire are refused
    unconverted, naming the tool whose parameters cross that bound; later ones are not converted.
    """
    specs: list[ToolSpec] = []
    fields: list[str] = []
    names: set[str] = set()
    parameters_bytes, bytes_bound = 0, STRUCT_BYTES_PER_JSON_CHAR * max_input_chars
    for index, tool in enumerate(chat.tools):
        where = f"chat.tools[{index}]"
        flat = bool(tool.name or tool.description or tool.HasField("parameters"))
        if tool.HasField("function") and flat:
            violations.append(
                FieldViolation(
                    where,
                    "give either function {name, description, parameters} or the flat "
                    "name, description, parameters, not both",
                )
            )
            continue
        if tool.type not in ("", "function"):
            violations.append(
                FieldViolation(f"{where}.type", f"must be 'function', got {excerpt(tool.type)}")
            )
        spec: pb.Function | pb.Tool = tool
        if tool.HasField("function"):
            where += ".function"
            spec = tool.function
        name, description = spec.name, spec.description
        parameters = None
        if spec.HasField("parameters") and parameters_bytes <= bytes_bound:
            parameters_bytes += spec.parameters.ByteSize()
            if parameters_bytes > bytes_bound:
                violations.append(
                    FieldViolation(
                        f"{where}.parameters",
                        f"the tools' parameters take {parameters_bytes} bytes of protobuf up to here, more "
                        f"than any within the {max_input_chars} characters of JSON the input's tokens "
                        "can hold",
                    )
                )
            else:
                parameters = _struct(spec.parameters, f"{where}.parameters", violations)
        if not TOOL_NAME.fullmatch(name):
            violations.append(
                FieldViolation(
                    f"{where}.name", f"must be 1 to 64 letters, digits, '_' or '-', got {excerpt(name)}"
                )
            )
        elif name in names:
            violations.append(FieldViolation(f"{where}.name", f"{excerpt(name)} names two tools"))
        names.add(name)
        if parameters is not None and parameters.get("type", "object") != "object":
            violations.append(
                FieldViolation(
                    f"{where}.parameters",
                    f"must be the JSON Schema of an object (type 'object'), got type "
                    f"{excerpt(dumps(parameters['type']))}",
                )
            )
        specs.append(ToolSpec(name, description, parameters))
        fields.append(where)
    return tuple(specs), tuple(fields)


def _tool_choice(value: str, tools: tuple[ToolSpec, ...], violations: list[FieldViolation]) -> ToolChoice:
    if value in ("", "auto"):
        return ToolChoice(ToolChoiceMode.AUTO)
    if value == "none":
        return ToolChoice(ToolChoiceMode.NONE)
    if not tools:
        violations.append(FieldViolation("chat.tool_choice", f"{excerpt(value)} needs chat.tools"))
        return ToolChoice()
    if value == "required":
        return ToolChoice(ToolChoiceMode.REQUIRED)
    if value not in {tool.name for tool in tools}:
        known = excerpt_list([tool.name for tool in tools])
        violations.append(
            FieldViolation(
                "chat.tool_choice",
                f"must be 'auto', 'none', 'required' or a tool's name ({known}), got {excerpt(value)}",
            )
        )
        return ToolChoice()
    return ToolChoice(ToolChoiceMode.FUNCTION, value)


def _response_format(
    response_format: pb.ResponseFormat, violations: list[FieldViolation]
) -> Mapping[str, Any] | None:
    kind = response_format.type
    has_schema = response_format.HasField("json_schema")
    if kind not in RESPONSE_FORMATS:
        violations.append(
            FieldViolation(
                "response_format.type", f"must be 'json_object' or 'json_schema', got {excerpt(kind)}"
            )
        )
        return None
    if kind == "json_object":
        if has_schema:
            violations.append(
                FieldViolation("response_format.json_schema", "applies to type 'json_schema' only")
            )
        return None
    if not has_schema:
        violations.append(FieldViolation("response_format.json_schema", "required with type 'json_schema'"))
        return None
    wire_bytes = response_format.json_schema.ByteSize()
    if wire_bytes > STRUCT_BYTES_PER_JSON_CHAR * MAX_SCHEMA_CHARS:
        violations.append(
            FieldViolation(
                "response_format.json_schema",
                f"must be at most {MAX_SCHEMA_CHARS} characters as compact JSON, got {wire_bytes} bytes "
                "of protobuf, more than any schema of that size takes",
            )
        )
        return None
    schema = _struct(response_format.json_schema, "response_format.json_schema", violations)
    if schema is None:
        return None
    # OpenAI's form wraps the schema: {"name": ..., "schema": {...}, "strict": ...}.
    wrapped = schema.get("schema")
    if isinstance(wrapped, dict) and "name" in schema and not {"type", "properties"} & schema.keys():
        schema = wrapped
    size = len(dumps(schema))
    if size > MAX_SCHEMA_CHARS:
        violations.append(
            FieldViolation(
                "response_format.json_schema",
                f"must be at most {MAX_SCHEMA_CHARS} characters as compact JSON, got {size}",
            )
        )
    return schema


def _constraint(output: _Output, grammars: GrammarCompiler | None) -> OutputConstraint | None:
    """The request's grammar, compiled; a schema llguidance refuses is INVALID_ARGUMENT naming it."""
    if not output.json_mode and not output.offers_tools:
        return None
    if grammars is None:
        where = "response_format" if output.json_mode else "chat.tools"
        raise UnsupportedFeatureError(f"{where}: this server was started without grammar support")
    try:
        if output.json_mode:
            return OutputConstraint(grammars.json_schema(output.json_schema, "response_format.json_schema"))
        grammar = grammars.tool_calls(output.tools, output.choice, "chat.tools")
    except GrammarError as exc:
        raise InvalidRequestError([_pinpoint(exc, output, grammars)]) from exc
    return OutputConstraint(grammar, tool_calls=True, text_allowed=output.choice.text_allowed)


def _pinpoint(error: GrammarError, output: _Output, grammars: GrammarCompiler) -> FieldViolation:
    """The tool whose parameters failed to compile (the error path only: one compile per tool)."""
    if output.json_mode:
        return FieldViolation(error.field, error.description)
    required = ToolChoice(ToolChoiceMode.REQUIRED)
    offered = output.choice.offered(output.tools)
    for tool, where in zip(output.tools, output.tool_fields):
        if tool not in offered:
            continue
        try:
            grammars.tool_calls([tool], required, "")
        except GrammarError as alone:
            return FieldViolation(f"{where}.parameters", alone.description)
    return FieldViolation(error.field, error.description)


def _struct(struct: struct_pb2.Struct, where: str, violations: list[FieldViolation]) -> dict[str, Any] | None:
    """A google.protobuf.Struct as the JSON Schema it holds, in a canonical key order.

    Struct is a map: the order of its keys is lost on the wire (and differs between processes), but
    llguidance generates properties in the order of `properties`, and the prompt lists schemas as
    text. So every object's keys are sorted, except that `properties` puts the names listed in the
    sibling `required` first, in that order: the same schema always gives the same grammar and
    prompt, and `required` is how a client orders the output. Struct also keeps every number as a
    double; whole numbers come back as int, as a JSON parser gives them (llguidance refuses
    "minLength": 2.0). A NaN or an infinity, which a Struct holds and JSON cannot, is a violation
    of `where` (None).
    """
    try:
        value = _canonical(json_format.MessageToDict(struct))
    except ValueError:  # protobuf's JSON form refuses NaN and infinity
        violations.append(FieldViolation(where, "holds NaN or an infinity, which are not JSON numbers"))
        return None
    assert isinstance(value, dict)
    return value


def _canonical(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    if isinstance(value, list):
        return [_canonical(item) for item in value]
    if not isinstance(value, dict):
        return value
    ordered = {key: _canonical(value[key]) for key in sorted(value)}
    properties, required = ordered.get("properties"), ordered.get("required")
    if isinstance(properties, dict) and isinstance(required, list):
        first = [name for name in dict.fromkeys(required) if isinstance(name, str) and name in properties]
        ordered["properties"] = {
            name: properties[name] for name in [*first, *properties] if name in properties
        }
    return ordered


def _sampling(message: pb.GenerateRequest, violations: list[FieldViolation]) -> SamplingParams:
    values: dict[str, float | int | None] = {}
    for name, (low, high) in NUMBER_BOUNDS.items():
        if not message.HasField(name):  # type: ignore[arg-type]
            continue
        value = float(getattr(message, name))
        if math.isnan(value) or not low <= value <= high:
            violations.append(
                FieldViolation(name, f"must be between {low:g} and {high:g}, got {number(value)}")
            )
        values[name] = value
    for name, (ilow, ihigh) in INTEGER_BOUNDS.items():
        if not message.HasField(name):  # type: ignore[arg-type]
            continue
        ivalue = int(getattr(message, name))
        if not ilow <= ivalue <= ihigh:
            violations.append(FieldViolation(name, f"must be between {ilow} and {ihigh}, got {ivalue}"))
        values[name] = ivalue
    if violations:
        return SamplingParams()
    return SamplingParams(**values)  # type: ignore[arg-type]


def _stop(message: pb.GenerateRequest, violations: list[FieldViolation]) -> tuple[str, ...]:
    if len(message.stop) > MAX_STOP_SEQUENCES:
        violations.append(
            FieldViolation("stop", f"at most {MAX_STOP_SEQUENCES} stop strings, got {len(message.stop)}")
        )
    for index, stop in enumerate(message.stop):
        if not stop or len(stop) > MAX_STOP_CHARS:
            violations.append(
                FieldViolation(f"stop[{index}]", f"must be 1 to {MAX_STOP_CHARS} characters, got {len(stop)}")
            )
    return tuple(message.stop)


def _prompt_ids(
    message: pb.GenerateRequest,
    tokenizer: Tokenizer,
    output: _Output,
    max_input_length: int,
    violations: list[FieldViolation],
) -> list[int] | None:
    which = message.WhichOneof("input")
    if which is None:
        violations.append(FieldViolation("input", "one of prompt or chat is required"))
        return None
    if which == "prompt":
        if not 1 <= len(message.prompt) <= MAX_PROMPT_CHARS:
            violations.append(
                FieldViolation(
                    "prompt", f"must be 1 to {MAX_PROMPT_CHARS} characters, got {len(message.prompt)}"
                )
            )
            return None
        return encode_prompt(tokenizer, message.prompt, message.raw)
    if message.raw:
        violations.append(FieldViolation("raw", "applies to prompt input only, not to chat"))
    chat = message.chat
    before = len(violations)
    for index, m in enumerate(chat.messages):
        if len(m.content) > MAX_CONTENT_CHARS:
            violations.append(
                FieldViolation(
                    f"chat.messages[{index}].content",
                    f"must be at most {MAX_CONTENT_CHARS} characters, got {len(m.content)}",
                )
            )
        if m.name and m.role == "tool" and not TOOL_NAME.fullmatch(m.name):
            violations.append(
                FieldViolation(
                    f"chat.messages[{index}].name",
                    f"a function's name: 1 to 64 letters, digits, '_' or '-', got {excerpt(m.name)}",
                )
            )
    if len(violations) > before:
        return None
    messages = [ChatMessage(m.role, m.content, m.name) for m in chat.messages]
    tools = tools_prompt(output.tools, output.choice)
    # Text that cannot fit in max_input_length tokens whatever its tokens is refused before it is
    # looked at: 4000 tools (890 KiB) took 600 ms of the event loop to tokenize, every other call
    # waiting, and the conversation's checks parse every tool call and result.
    chars = len(tools) + sum(len(m.content) + (len(m.name) if m.role == "tool" else 0) for m in messages)
    if chars > max_input_length * tokenizer.longest_piece:
        violations.append(
            FieldViolation(
                "input",
                f"{chars} characters of messages and tools exceed what max_input_length="
                f"{max_input_length} tokens can hold (a token is at most {tokenizer.longest_piece} "
                "characters)",
            )
        )
        return None
    try:
        return encode_chat(tokenizer, messages, tools)  # checks the conversation before tokenizing it
    except PromptError as exc:
        field, _, description = str(exc).partition(": ")
        violations.append(FieldViolation(f"chat.{field}", description))
        return None


def _check_token_limits(
    input_tokens: int, max_tokens: int, config: ModelConfig, violations: list[FieldViolation]
) -> None:
    if input_tokens > config.max_input_length:
        violations.append(
            FieldViolation(
                "input", f"{input_tokens} input tokens exceed max_input_length={config.max_input_length}"
            )
        )
    elif input_tokens + max_tokens > config.max_total_tokens:
        violations.append(
            FieldViolation(
                "max_tokens",
                f"{input_tokens} input tokens + max_tokens {max_tokens} = "
                f"{input_tokens + max_tokens} exceed "
                f"max_total_tokens={config.max_total_tokens}",
            )
        )
