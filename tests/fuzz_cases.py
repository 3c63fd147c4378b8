"""Fuzz cases for the textgen API, and the oracle that says which status codes each may get.

Bodies are drawn from the Workers AI card's input schema (tests/data/input.schema.json) plus the
proto's extension `stop` (with the bounds the README documents); every body drawn as valid is
checked valid by jsonschema. From them come:

- valid bodies, with a deadline or a cancel now and then;
- just-invalid bodies: one bound of the schema crossed by the least step (every minimum, maximum,
  minLength, maxLength and maxItems, enumerated from the schema), or a number that is not finite;
- huge fields: one string or array of a body blown up to 10 kB .. 4.5 MB;
- raw bytes no stub could send: invalid UTF-8 in each string field of the proto, truncated and
  bit-flipped encodings, JSON nested past protobuf's depth limit in tool parameters, and random
  bytes for GetModelInfo.

The oracle derives the allowed codes from the body alone: jsonschema's errors (mapped to the
proto's field paths) and the rules the card's schema cannot say (the README's: a conversation
without tools is system*, then user (assistant user)*; tool names, tool_choice, response_format;
token limits, counted by mistral-common; NaN) make INVALID_ARGUMENT required or possible and name
the fields it may report; where the oracle cannot tell (a schema llguidance may refuse, a
conversation with tool results, a prompt with tools in it) it allows both answers, naming only
those fields. An adapter name allows NOT_FOUND (this server has none); a message over the server's
--max-message-bytes gets RESOURCE_EXHAUSTED. For raw bytes, protobuf itself is the reference: what
it cannot decode must be INVALID_ARGUMENT, what it can is judged as the body it decodes to.
INTERNAL and UNKNOWN are never allowed.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jsonschema
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import assume
from hypothesis import strategies as st
from textgen.v1 import textgen_pb2 as pb

SCHEMA: dict[str, Any] = json.loads((Path(__file__).parent / "data" / "input.schema.json").read_text())
# The proto's extension beyond the card, with the bounds the README documents.
EXTENSIONS: dict[str, Any] = {
    "stop": {"type": "array", "maxItems": 4, "items": {"type": "string", "minLength": 1, "maxLength": 256}}
}
PROMPT_BRANCH, CHAT_BRANCH = (
    {"type": SCHEMA["type"], **branch, "properties": {**branch["properties"], **EXTENSIONS}}
    for branch in SCHEMA["oneOf"]
)
BRANCHES = (PROMPT_BRANCH, CHAT_BRANCH)
VALIDATORS = tuple(jsonschema.Draft202012Validator(branch) for branch in BRANCHES)

MAX_DETAILS_CHARS = 2048  # no status message may be longer: it quotes excerpts only (issue 14, cause 4)
DEFAULT_MAX_TOKENS = 256
ROLES = ("system", "user", "assistant")
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # the README's rule for function names (OpenAI's)
LONGEST_TOKEN_CHARS = 16  # the most characters one token of the tokenizer covers (the README's)
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
SAMPLING_NUMBERS = ("temperature", "top_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
SAMPLING_INTEGERS = {"top_k": INT32, "seed": INT64}

Code = grpc.StatusCode
OK = Code.OK


@dataclass(frozen=True)
class Limits:
    """The served model's token limits, as GetModelInfo reports them, and the server's message cap."""

    max_input_length: int
    max_total_tokens: int
    max_message_bytes: int  # the server's --max-message-bytes: a larger request is RESOURCE_EXHAUSTED


@dataclass(frozen=True)
class Expectation:
    codes: frozenset[grpc.StatusCode]
    may_name: frozenset[str] = frozenset()  # INVALID_ARGUMENT names only these fields (prefixes); empty: any
    must_name: frozenset[str] = frozenset()  # ... and at least one of these, when any


@dataclass(frozen=True)
class Case:
    kind: str
    method: str  # Generate, GenerateStream or GetModelInfo
    data: bytes
    expect: Expectation
    timeout: float | None = None  # a deadline the client sets: DEADLINE_EXCEEDED is then allowed
    cancel_after: int | None = None  # a stream the client cancels after this many messages
    note: str = ""

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis prints failing cases so
        printer.text(repr(self))

    def __repr__(self) -> str:  # what a failure prints: short, never megabytes
        return (
            f"Case({self.kind}, {self.method}, {len(self.data)} bytes {self.data[:120]!r}, "
            f"timeout={self.timeout}, cancel_after={self.cancel_after}, {self.note})"
        )


# -- strategies from the schema ---------------------------------------------------------------------


def _exact_length(unit: str, length: int) -> str:
    return (unit * length)[:length] if unit else "x" * length


def _string(schema: dict[str, Any]) -> st.SearchStrategy[str]:
    low, high = schema.get("minLength", 0), schema.get("maxLength")
    short = st.text(min_size=low, max_size=min(high or 40, 40))
    if high is None:
        return short
    # The bound itself and one below it: cheap to draw as a repeated unit of random text.
    at_bound = st.tuples(st.text(min_size=1, max_size=4), st.sampled_from([high, high - 1])).map(
        lambda unit_length: _exact_length(*unit_length)
    )
    return st.one_of(short, short, short, short, at_bound)


def _number(schema: dict[str, Any]) -> st.SearchStrategy[float]:
    low, high = schema["minimum"], schema["maximum"]
    edges = [low, high, math.nextafter(low, math.inf), math.nextafter(high, -math.inf), 5e-324]
    return st.one_of(st.floats(low, high), st.sampled_from([e for e in edges if low <= e <= high]))


def _integer(schema: dict[str, Any]) -> st.SearchStrategy[int]:
    low, high = schema["minimum"], schema["maximum"]
    return st.one_of(st.integers(low, high), st.sampled_from([low, high, low + 1, high - 1]))


def _conversation(messages: list[dict[str, str]], system: int) -> list[dict[str, str]]:
    """Roles rewritten to the one shape the v1 format takes: system*, then user (assistant user)*."""
    turns = messages[system:] or [{"role": "user", "content": "Hi"}]
    if len(turns) % 2 == 0:
        turns = turns[:-1]
    shaped = [{**m, "role": "system"} for m in messages[:system]]
    for index, message in enumerate(turns):
        role = "user" if index % 2 == 0 else "assistant"
        content = message["content"] or ("ok" if role == "assistant" else "")
        shaped.append({"role": role, "content": content})
    return shaped


def _overrides() -> dict[tuple[str, ...], Callable[[dict[str, Any]], st.SearchStrategy[Any]]]:
    """Where the schema alone would make a poor fuzzer; each still yields values the schema allows."""
    return {
        # Unbounded in the card: mostly short runs (the suite stays fast), any int32 now and then.
        ("max_tokens",): lambda _: st.one_of(st.integers(1, 48), st.integers(1, 48), st.integers(*INT32)),
        # Any string is a valid role to the schema; the three real ones come up often.
        ("messages", "*", "role"): lambda _: st.one_of(st.sampled_from(ROLES), st.text(max_size=12)),
        # Half the conversations are well formed, so that chat bodies reach generation.
        ("messages",): lambda schema: st.one_of(
            st.lists(from_schema(schema["items"], ("messages", "*")), max_size=5),
            st.builds(
                _conversation,
                st.lists(from_schema(schema["items"], ("messages", "*")), min_size=1, max_size=5),
                st.integers(0, 2),
            ),
        ),
        # Tools: present in a third of the chats; names and types valid more often than chance.
        ("tools",): lambda schema: st.one_of(
            st.just([]), st.just([]), st.lists(from_schema(schema["items"], ("tools", "*")), max_size=2)
        ),
        ("tools", "*", "type"): lambda _: st.one_of(st.just("function"), st.text(max_size=8)),
        ("tools", "*", "function", "name"): lambda _: st.one_of(
            st.from_regex(TOOL_NAME, fullmatch=True), st.text(max_size=12)
        ),
        ("tools", "*", "function", "parameters", "type"): lambda _: st.one_of(
            st.just("object"), st.text(max_size=8)
        ),
        # Without a type (the card allows that), or array or object, a property is open JSON.
        ("tools", "*", "function", "parameters", "properties", "*", "type"): lambda _: st.one_of(
            st.sampled_from(["string", "number", "integer", "boolean", "array", "object"]),
            st.text(max_size=8),
        ),
        # An adapter name ends a request early (NOT_FOUND): present, but not often.
        ("lora",): lambda _: st.one_of(st.just(""), st.just(""), st.just(""), st.text(max_size=16)),
    }


def from_schema(schema: dict[str, Any], path: tuple[str, ...] = ()) -> st.SearchStrategy[Any]:
    """Values valid under `schema`: the subset of JSON Schema the card uses (no $ref, no patterns)."""
    override = _overrides().get(path)
    if override is not None:
        return override(schema)
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties", {})
        required = set(schema.get("required", ()))
        strategy: st.SearchStrategy[Any] = st.fixed_dictionaries(
            {name: from_schema(sub, (*path, name)) for name, sub in properties.items() if name in required},
            optional={
                name: from_schema(sub, (*path, name))
                for name, sub in properties.items()
                if name not in required
            },
        )
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            more = st.dictionaries(st.text(max_size=12), from_schema(extra, (*path, "*")), max_size=3)
            strategy = st.tuples(strategy, more).map(lambda pair: {**pair[1], **pair[0]})
        return strategy
    if kind == "array":
        items = from_schema(schema["items"], (*path, "*"))
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=min(schema.get("maxItems", 4), 4))
    if kind == "string":
        return _string(schema)
    if kind == "number":
        return _number(schema)
    if kind == "integer":
        return _integer(schema)
    if kind == "boolean":
        return st.booleans()
    raise AssertionError(f"the card's schema uses {kind!r} at {path}: teach from_schema about it")


@functools.cache
def valid_bodies(branch: int | None = None) -> st.SearchStrategy[dict[str, Any]]:
    """Card bodies that jsonschema accepts (asserted, so the generator cannot drift from the schema)."""
    chosen = (0, 1) if branch is None else (branch,)
    return st.one_of([from_schema(BRANCHES[i]).map(functools.partial(_checked_valid, i)) for i in chosen])


def _checked_valid(branch: int, body: dict[str, Any]) -> dict[str, Any]:
    jsonschema.validate(body, SCHEMA)  # the card's own schema: exactly one branch matches
    VALIDATORS[branch].validate(body)  # and the extension's bounds
    return body


# -- bodies → protobuf, and back ---------------------------------------------------------------------


def to_message(body: dict[str, Any]) -> pb.GenerateRequest:
    message = pb.GenerateRequest()
    if "prompt" in body:
        message.prompt = body["prompt"]
    if "messages" in body:
        message.chat.SetInParent()
        for m in body["messages"]:
            message.chat.messages.add(role=m["role"], content=m["content"], name=m.get("name", ""))
        for tool in body.get("tools", ()):
            json_format.ParseDict(tool, message.chat.tools.add())
        message.chat.tool_choice = body.get("tool_choice", "")
    for name in ("raw", "lora", "max_tokens", *SAMPLING_NUMBERS, *SAMPLING_INTEGERS):
        if name in body:
            setattr(message, name, body[name])
    message.stop.extend(body.get("stop", ()))
    if "response_format" in body:
        json_format.ParseDict(body["response_format"], message.response_format)
    return message


def to_body(message: pb.GenerateRequest) -> dict[str, Any]:
    """The card body a decoded message stands for (the oracle judges bodies)."""
    body: dict[str, Any] = {}
    which = message.WhichOneof("input")
    if which == "prompt":
        body["prompt"] = message.prompt
    elif which == "chat":
        body["messages"] = [
            {"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})}
            for m in message.chat.messages
        ]
        if message.chat.tools:
            body["tools"] = [
                json_format.MessageToDict(t, preserving_proto_field_name=True) for t in message.chat.tools
            ]
        if message.chat.tool_choice:
            body["tool_choice"] = message.chat.tool_choice
    if message.raw:
        body["raw"] = True
    if message.lora:
        body["lora"] = message.lora
    for name in ("max_tokens", *SAMPLING_NUMBERS, *SAMPLING_INTEGERS):
        if message.HasField(name):  # type: ignore[arg-type]
            body[name] = getattr(message, name)
    if message.stop:
        body["stop"] = list(message.stop)
    if message.HasField("response_format"):
        body["response_format"] = json_format.MessageToDict(
            message.response_format, preserving_proto_field_name=True
        )
    return body


def _proto_path(path: Iterator[Any] | list[Any]) -> str:
    """jsonschema's ['messages', 0, 'content'] → the proto's chat.messages[0].content."""
    text = ""
    for step in path:
        if isinstance(step, int):
            text += f"[{step}]"
        else:
            text += f".{step}" if text else ("chat." + step if step in ("messages", "tools") else step)
    return text


# -- the oracle -------------------------------------------------------------------------------------


def conversation_is_well_formed(messages: list[dict[str, str]]) -> bool:
    """The README's rule without tools: system*, then user (assistant user)*, assistants never empty."""
    roles = [m["role"] for m in messages]
    system = 0
    while system < len(roles) and roles[system] == "system":
        system += 1
    turns = messages[system:]
    if not turns or len(turns) % 2 == 0:
        return False
    for index, message in enumerate(turns):
        if message["role"] != ("user" if index % 2 == 0 else "assistant"):
            return False
        if message["role"] == "assistant" and not message["content"]:
            return False
    return True


@functools.cache
def _mistral() -> Any:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.v1()


def prompt_tokens(body: dict[str, Any]) -> int:
    """How many tokens the body's prompt is, by mistral-common (the reference tests/test_prompt.py holds
    the server to); only for prompts and well-formed conversations."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    mistral = _mistral()
    if "prompt" in body:
        if body.get("raw"):
            text = body["prompt"].removeprefix("<s>")
            return len(mistral.instruct_tokenizer.tokenizer.encode(text, bos=True, eos=False))
        messages: list[dict[str, str]] = [{"role": "user", "content": body["prompt"]}]
    else:
        messages = body["messages"]
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    return len(mistral.encode_chat_completion(request).tokens)


def _looks_like_calls(content: str) -> bool:
    """An assistant message the server may read as tool calls (JSON), not as text."""
    return content.strip().startswith(("{", "["))


def _tool_rules(body: dict[str, Any], certain: set[str], possible: set[str]) -> bool:
    """The README's rules for tools and tool_choice; returns whether tools are offered."""
    tools = body.get("tools") or []
    names: set[str] = set()
    for index, tool in enumerate(tools):
        where = f"chat.tools[{index}]"
        flat = any(key in tool for key in ("name", "description", "parameters"))
        if "function" in tool and flat:
            certain.add(where)  # one form or the other, not both
            continue
        if tool.get("type", "") not in ("", "function"):
            certain.add(f"{where}.type")
        if "function" in tool:
            where += ".function"
        spec = tool.get("function", tool)
        name = spec.get("name", "")
        if not TOOL_NAME.fullmatch(name) or name in names:
            certain.add(f"{where}.name")
        names.add(name)
        parameters = spec.get("parameters")
        if parameters is not None and parameters.get("type", "object") != "object":
            certain.add(f"{where}.parameters")
        elif parameters is not None:
            possible.add(f"{where}.parameters")  # a schema llguidance may refuse
    if tools:
        possible.add("chat.tools")  # a grammar that fails without a tool to blame
    choice = body.get("tool_choice", "")
    if choice not in ("", "auto", "none") and (not tools or (choice != "required" and choice not in names)):
        certain.add("chat.tool_choice")
    return bool(tools) and choice != "none"


def _response_format_rules(
    body: dict[str, Any], offers_tools: bool, certain: set[str], possible: set[str]
) -> None:
    response_format = body.get("response_format")
    if response_format is None:
        return
    kind = response_format.get("type", "")
    has_schema = "json_schema" in response_format
    if kind not in ("json_object", "json_schema") or (kind == "json_object") == has_schema:
        certain.add("response_format")  # .type or .json_schema
    elif kind == "json_schema":
        possible.add("response_format.json_schema")  # too long, or refused by llguidance
    if offers_tools:
        certain.add("response_format")
    if body.get("stop"):
        certain.add("stop")


def expect_for_body(body: dict[str, Any], encoded_size: int, limits: Limits) -> Expectation:
    if encoded_size > limits.max_message_bytes:
        return Expectation(frozenset({Code.RESOURCE_EXHAUSTED}))
    certain: set[str] = set()  # fields the server must refuse (it names at least one)
    possible: set[str] = set()  # fields it may name besides
    if "prompt" in body:
        branch = 0
    elif "messages" in body:
        branch = 1
    else:
        branch = 0 if "raw" in body else 1
        certain.add("input")
    for error in VALIDATORS[branch].iter_errors(body):
        where = list(error.absolute_path)
        if where and where[0] == "tools":
            continue  # the card's shape of a tool; what the server requires of one is in _tool_rules
        if error.validator == "required":
            continue  # the missing input, counted above
        certain.add(_proto_path(where))
    for name in SAMPLING_NUMBERS:
        if name in body and not math.isfinite(body[name]):
            certain.add(name)  # NaN passes jsonschema's minimum and maximum
    max_tokens = body.get("max_tokens", DEFAULT_MAX_TOKENS)
    if max_tokens < 1:
        certain.add("max_tokens")
    offers_tools = _tool_rules(body, certain, possible) if "messages" in body else False
    _response_format_rules(body, offers_tools, certain, possible)
    messages = body.get("messages", [])
    if "messages" in body and body.get("raw"):
        certain.add("raw")
    for index, m in enumerate(messages):
        if m["role"] == "tool" and m.get("name") and not TOOL_NAME.fullmatch(m["name"]):
            certain.add(f"chat.messages[{index}].name")
    # Text that no max_input_length tokens can hold is refused before the conversation's shape is
    # looked at (unless a message's own content or name was refused): counted without the text the
    # server adds, it is certain; with offered tools, whose prompt only the server writes, possible.
    if "messages" in body and not any(f.startswith("chat.messages[") for f in certain):
        chars = sum(
            len(m["content"]) + (len(m.get("name", "")) if m["role"] == "tool" else 0) for m in messages
        )
        if chars > limits.max_input_length * LONGEST_TOKEN_CHARS:
            certain.add("input")
        elif body.get("tools"):
            possible.add("input")
    roles = {m["role"] for m in messages}
    # Tool results and assistant messages holding calls follow rules of their own (the README's
    # Tools section): with those, the shape can be right or wrong; without, the plain rule decides.
    plain = "tool" not in roles and not any(
        m["role"] == "assistant" and _looks_like_calls(m["content"]) for m in messages
    )
    if "messages" in body and not roles <= {"system", "user", "assistant", "tool"}:
        certain.add("chat.messages")
    elif "messages" in body and not conversation_is_well_formed(messages):
        possible.add("chat.messages")  # a content violation is reported first, or tools make it valid
        if plain and not any(f.startswith("chat.messages") for f in certain):
            certain.add("chat.messages")
    # Token limits count the prompt the server would build: only once it is built, after the checks
    # of lengths and of the conversation's shape. Offered tools and tool results add text of the
    # server's own to the prompt: then the oracle cannot count, and either answer may come.
    too_long = {f for f in certain if f in ("prompt", "input") or f.startswith("chat.messages")}
    if not too_long and (offers_tools or not plain or any("name" in m for m in messages)):
        possible.update({"input", "max_tokens"})
    elif not too_long:
        tokens = prompt_tokens(body)
        if tokens > limits.max_input_length:
            certain.add("input")
        elif max_tokens >= 1 and tokens + max_tokens > limits.max_total_tokens:
            certain.add("max_tokens")
    codes: set[grpc.StatusCode] = set()
    if certain or possible:
        codes.add(Code.INVALID_ARGUMENT)
    if body.get("lora"):
        codes.add(Code.NOT_FOUND)
    if not (certain or body.get("lora")):
        codes.add(OK)
    return Expectation(frozenset(codes), frozenset(certain | possible), frozenset(certain))


def expect_for_bytes(data: bytes, limits: Limits) -> Expectation:
    """protobuf decides: undecodable is INVALID_ARGUMENT, decodable is judged as its body."""
    if len(data) > limits.max_message_bytes:
        return Expectation(frozenset({Code.RESOURCE_EXHAUSTED}))
    try:
        message = pb.GenerateRequest.FromString(data)
    except DecodeError:
        return Expectation(frozenset({Code.INVALID_ARGUMENT}))
    return expect_for_body(to_body(message), len(data), limits)


# -- cases ------------------------------------------------------------------------------------------


def _method(stream: bool) -> str:
    return "GenerateStream" if stream else "Generate"


@st.composite
def _abuse(draw: st.DrawFn, stream: bool) -> tuple[float | None, int | None]:
    """Now and then a deadline (some shorter than a prefill) or, on a stream, a cancel."""
    timeout = draw(st.one_of(st.none(), st.none(), st.none(), st.floats(0.0005, 0.3)))
    cancel_after = draw(st.one_of(st.none(), st.none(), st.integers(0, 4))) if stream else None
    return timeout, cancel_after


def valid_cases(limits: Limits) -> st.SearchStrategy[Case]:
    @st.composite
    def build(draw: st.DrawFn) -> Case:
        body = draw(valid_bodies())
        if "max_tokens" not in body and draw(st.integers(0, 3)):
            body["max_tokens"] = draw(st.integers(1, 48))  # the default 256 a quarter of the time: fast
        stream = body.get("stream", False)
        timeout, cancel_after = draw(_abuse(stream))
        data = to_message(body).SerializeToString()
        expect = expect_for_body(body, len(data), limits)
        return Case("valid", _method(stream), data, expect, timeout, cancel_after, _keys(body))

    return build()


@dataclass(frozen=True)
class Bound:
    """One bound of the schema: crossing it by the least step must be refused, naming the field."""

    branch: int
    path: tuple[str, ...]  # "*" stands for an item of an array
    keyword: str
    limit: float
    kind: str


def schema_bounds() -> list[Bound]:
    found: list[Bound] = []

    def walk(schema: dict[str, Any], branch: int, path: tuple[str, ...]) -> None:
        for keyword in ("minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems"):
            if keyword in schema and not (keyword in ("minLength", "minItems") and schema[keyword] == 0):
                found.append(Bound(branch, path, keyword, schema[keyword], schema["type"]))
        for name, sub in schema.get("properties", {}).items():
            walk(sub, branch, (*path, name))
        if "items" in schema:
            walk(schema["items"], branch, (*path, "*"))

    for index, branch in enumerate(BRANCHES):
        walk(branch, index, ())
    return found


def _beyond(bound: Bound) -> st.SearchStrategy[Any]:
    """Values just past `bound`, within what the proto field can carry."""
    below = bound.keyword.startswith("min")
    if bound.kind == "number":
        step = math.nextafter(bound.limit, -math.inf if below else math.inf)
        far = [bound.limit - 1, -math.inf, -1e308] if below else [bound.limit + 1, math.inf, 1e308]
        return st.sampled_from([step, step, *far, math.nan])
    if bound.kind == "integer":
        low, high = INT64 if bound.path[-1] == "seed" else INT32
        return st.sampled_from([int(bound.limit) - 1, low] if below else [int(bound.limit) + 1, high])
    if bound.kind == "string":
        length = int(bound.limit) - 1 if below else int(bound.limit) + 1
        return st.text(min_size=1, max_size=3).map(lambda unit: _exact_length(unit, length))
    raise AssertionError(f"no values beyond a {bound.kind} bound")


def _set(
    body: dict[str, Any], path: tuple[str, ...], value: Any, item: Callable[[tuple[str, ...]], Any]
) -> None:
    """body at `path` := value; an array on the way gets an item (drawn by `item`) when it has none."""
    node: Any = body
    parent: Any = None
    key: Any = None
    for depth, step in enumerate(path):
        if step == "*":
            if not node:
                node.append(item(path[: depth + 1]))
            parent, key = node, 0
        else:
            if step not in node:
                node[step] = [] if path[depth + 1 : depth + 2] == ("*",) else {}
            parent, key = node, step
        node = parent[key]
    parent[key] = value


def just_invalid_cases(limits: Limits, bound: Bound) -> st.SearchStrategy[Case]:
    """Valid bodies with `bound` crossed."""

    @st.composite
    def build(draw: st.DrawFn) -> Case:
        body = copy.deepcopy(draw(valid_bodies(bound.branch)))
        stream = body.get("stream", False)
        if bound.keyword.endswith("Items"):  # an array one item past its limit
            items = draw(
                st.lists(
                    from_schema(BRANCHES[bound.branch]["properties"][bound.path[0]]["items"]),
                    min_size=int(bound.limit) + 1,
                    max_size=int(bound.limit) + 3,
                )
            )
            body[bound.path[0]] = items
        else:
            value = draw(_beyond(bound))

            def item(prefix: tuple[str, ...]) -> Any:
                schema: dict[str, Any] = BRANCHES[bound.branch]
                for step in prefix:
                    schema = schema["items"] if step == "*" else schema["properties"][step]
                return draw(from_schema(schema))

            _set(body, bound.path, value, item)
        data = to_message(body).SerializeToString()
        expect = expect_for_body(body, len(data), limits)
        note = f"{'.'.join(bound.path)} {bound.keyword} {bound.limit}"
        return Case("just-invalid", _method(stream), data, expect, note=note)

    return build()


def _array_locations(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(node, list):
        if node:
            yield path
        for index, value in enumerate(node):
            yield from _array_locations(value, (*path, index))
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _array_locations(value, (*path, key))


def _replace(body: Any, path: tuple[Any, ...], value: Any) -> None:
    for step in path[:-1]:
        body = body[step]
    body[path[-1]] = value


HUGE_SIZES = [10_000, 100_000, 1_000_000, 4_500_000]  # characters: under and over the message cap


def huge_string_cases(limits: Limits, path: str) -> st.SearchStrategy[Case]:
    """The string field at `path` 10 kB .. 4.5 MB long."""

    @st.composite
    def build(draw: st.DrawFn) -> Case:
        body = draw(valid_bodies())
        size = draw(st.sampled_from(HUGE_SIZES))
        unit = draw(st.sampled_from(["x", "é", "\U0001f600", "ab c"]))
        message = to_message(body)
        put_string(message, path, _exact_length(unit, size))
        body = to_body(message)
        data = message.SerializeToString()
        expect = expect_for_body(body, len(data), limits)
        return Case(
            "huge", _method(body.get("stream", False)), data, expect, note=f"{path} of {size} characters"
        )

    return build()


def huge_array_cases(limits: Limits) -> st.SearchStrategy[Case]:
    """One array of the body (messages, stop, tools, ...) repeated to thousands of items."""

    @st.composite
    def build(draw: st.DrawFn) -> Case:
        body = copy.deepcopy(draw(valid_bodies()))
        body["stop"] = body.get("stop") or ["."]
        where = draw(st.sampled_from(list(_array_locations(body))))
        size = draw(st.sampled_from([1_000, 5_000]))
        node: Any = body
        for step in where:
            node = node[step]
        _replace(body, where, (node * size)[:size])
        data = to_message(body).SerializeToString()
        expect = expect_for_body(body, len(data), limits)
        note = f"{_proto_path(list(where))} of {size} items"
        return Case("huge", _method(body.get("stream", False)), data, expect, note=note)

    return build()


def string_fields(descriptor: Descriptor = pb.GenerateRequest.DESCRIPTOR, path: str = "") -> Iterator[str]:
    """Every string field of the request, as the server names it ([0] for repeated; a Struct as a whole)."""
    for fd in descriptor.fields:
        name = f"{path}.{fd.name}" if path else fd.name
        if fd.is_repeated:
            name += "[0]"
        if fd.type == FieldDescriptor.TYPE_STRING:
            yield name
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            if fd.message_type.file.package == "google.protobuf":
                yield name
            else:
                yield from string_fields(fd.message_type, name)


MARK = "\U000f0000\U000f0001"  # private-use characters: 8 bytes, replaced by 8 bytes of invalid UTF-8


def put_string(message: pb.GenerateRequest, path: str, text: str) -> None:
    """Put `text` in the string field at `path` (first of a repeated one), creating what leads to it;
    a prompt or chat field switches the input oneof."""
    node: Any = message
    steps = path.split(".")
    for step in steps[:-1]:
        name, _, index = step.partition("[")
        child = getattr(node, name)
        if index:
            if not child:
                child.add()
            child = child[0]
        node = child
    name, _, index = steps[-1].partition("[")
    target = getattr(node, name)
    if index:
        target.insert(0, text)
    elif isinstance(target, str):
        setattr(node, name, text)
    else:  # a Struct: the text as a key or as a string value
        target.update({text: "v"} if len(target) % 2 else {"k": text})


def utf8_cases(path: str) -> st.SearchStrategy[Case]:
    """Valid bodies whose string field at `path` holds invalid UTF-8."""
    invalid = st.binary(min_size=len(MARK.encode()), max_size=len(MARK.encode())).filter(_not_utf8)

    @st.composite
    def build(draw: st.DrawFn) -> Case:
        body = draw(valid_bodies())
        message = to_message(body)
        put_string(message, path, MARK)
        data = message.SerializeToString()
        assume(data.count(MARK.encode()) == 1)
        data = data.replace(MARK.encode(), draw(invalid))
        expect = Expectation(frozenset({Code.INVALID_ARGUMENT}), frozenset({path}), frozenset({path}))
        return Case("invalid-utf8", _method(body.get("stream", False)), data, expect, note=path)

    return build()


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def mangled_cases(limits: Limits) -> st.SearchStrategy[Case]:
    """Valid encodings cut short or with bits flipped; protobuf says whether they still decode."""

    @st.composite
    def build(draw: st.DrawFn) -> Case:
        body = draw(valid_bodies())
        data = bytearray(to_message(body).SerializeToString())
        if draw(st.booleans()) and data:
            cut = draw(st.integers(0, len(data) - 1))
            data = data[:cut]
            kind, note = "truncated", f"cut at {cut} of {len(data)}"
        else:
            flips = draw(st.lists(st.integers(0, max(len(data) * 8 - 1, 0)), min_size=1, max_size=4))
            for bit in flips:
                if data:
                    data[bit // 8] ^= 1 << (bit % 8)
            kind, note = "bit-flipped", f"bits {flips}"
        raw = bytes(data)
        return Case(kind, _method(body.get("stream", False)), raw, expect_for_bytes(raw, limits), note=note)

    return build()


def nesting_cases(limits: Limits) -> st.SearchStrategy[Case]:
    """Tool parameters nested 1..150 JSON levels (objects or arrays); protobuf decodes about 32."""

    @st.composite
    def build(draw: st.DrawFn) -> Case:
        depth = draw(st.integers(1, 150))
        arrays = draw(st.booleans())
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        message = to_message(body)
        tool = message.chat.tools.add(type="function")
        tool.function.name = "f"
        # Built through the Struct API: json_format refuses to parse past its own depth of 100.
        value = tool.function.parameters.fields["properties"]
        for _ in range(depth):
            value = value.list_value.values.add() if arrays else value.struct_value.fields["a"]
        value.string_value = draw(st.text(max_size=5))
        data = message.SerializeToString()
        expect = expect_for_bytes(data, limits)
        if Code.INVALID_ARGUMENT in expect.codes:
            place = frozenset({"chat.tools[0].function.parameters"})
            expect = Expectation(expect.codes, place, place)
        return Case(
            "deep-nesting",
            "Generate",
            data,
            expect,
            note=f"depth {depth} {'arrays' if arrays else 'objects'}",
        )

    return build()


def model_info_cases() -> st.SearchStrategy[Case]:
    def case(data: bytes) -> Case:
        try:
            pb.GetModelInfoRequest.FromString(data)
            codes = frozenset({OK})
        except DecodeError:
            codes = frozenset({Code.INVALID_ARGUMENT})
        return Case("model-info-bytes", "GetModelInfo", data, Expectation(codes))

    unknown_fields = st.lists(
        st.sampled_from([b"\x08\x01", b"\x12\x02ab", b"\x1d\x00\x00\x80\x3f", b"\x0a"]), max_size=4
    )
    return st.one_of(st.binary(max_size=48), unknown_fields.map(b"".join)).map(case)


def _keys(body: dict[str, Any]) -> str:
    return ",".join(sorted(body))


# -- sending a case and judging the outcome -----------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    messages: list[bytes] = field(default_factory=list)
    violations: dict[str, str] = field(default_factory=dict)
    has_bad_request: bool = False


# A request with no deadline of its own still gets one, so that a hang fails the run instead of
# stalling it (DEADLINE_EXCEEDED is allowed only where the case set a deadline).
SAFETY_TIMEOUT = 120.0


def send(channel: grpc.Channel, case: Case) -> Outcome:
    method = f"/textgen.v1.TextGeneration/{case.method}"
    timeout = case.timeout if case.timeout is not None else SAFETY_TIMEOUT
    messages: list[bytes] = []
    try:
        if case.method == "GenerateStream":
            call = channel.unary_stream(method)(case.data, timeout=timeout)
            if case.cancel_after == 0:
                call.cancel()
            for message in call:
                messages.append(message)
                if case.cancel_after is not None and len(messages) >= case.cancel_after:
                    call.cancel()
        else:
            messages.append(channel.unary_unary(method)(case.data, timeout=timeout))
    except grpc.RpcError as error:
        outcome = Outcome(error.code(), error.details() or "", messages)
        # Only an INVALID_ARGUMENT carries a BadRequest. (A call we cancelled can hold the server's
        # INVALID_ARGUMENT details in its trailers with the code CANCELLED: from_call refuses that.)
        status = None
        if outcome.code == Code.INVALID_ARGUMENT:
            status = rpc_status.from_call(error)  # type: ignore[arg-type]
        if status is not None:
            for detail in status.details:
                bad = error_details_pb2.BadRequest()
                if detail.Unpack(bad):
                    outcome.has_bad_request = True
                    outcome.violations.update({v.field: v.description for v in bad.field_violations})
        return outcome
    return Outcome(OK, "", messages)


def check(case: Case, outcome: Outcome, limits: Limits) -> None:
    """Raise AssertionError saying how `outcome` breaks the oracle."""
    code = outcome.code
    allowed = set(case.expect.codes)
    if case.timeout is not None:
        allowed.add(Code.DEADLINE_EXCEEDED)
    if case.cancel_after is not None:
        allowed.add(Code.CANCELLED)
    context = f"{case!r} got {code.name}: {outcome.details[:300]!r}"
    assert code not in (Code.INTERNAL, Code.UNKNOWN), context
    assert code in allowed, f"{context}; allowed {sorted(c.name for c in allowed)}"
    assert len(outcome.details) <= MAX_DETAILS_CHARS, (
        f"{context}: details of {len(outcome.details)} characters"
    )
    if code == Code.INVALID_ARGUMENT:
        assert outcome.has_bad_request, f"{context}: no google.rpc.BadRequest"
        named = set(outcome.violations)
        if case.expect.may_name:
            stray = {f for f in named if not any(f.startswith(p) for p in case.expect.may_name)}
            assert not stray, f"{context}: names {stray}, expected within {sorted(case.expect.may_name)}"
        if case.expect.must_name:
            assert any(f.startswith(p) for f in named for p in case.expect.must_name), (
                f"{context}: names {sorted(named)}, expected one of {sorted(case.expect.must_name)}"
            )
    if code == OK:
        _check_response(case, outcome, limits, context)


def _check_response(case: Case, outcome: Outcome, limits: Limits, context: str) -> None:
    if case.method == "GetModelInfo":
        info = pb.GetModelInfoResponse.FromString(outcome.messages[0])
        assert (info.max_input_length, info.max_total_tokens) == (
            limits.max_input_length,
            limits.max_total_tokens,
        )
        return
    if case.method == "Generate":
        response = pb.GenerateResponse.FromString(outcome.messages[0])
        finish, usage = response.finish_reason, response.usage
    else:
        chunks = [pb.GenerateStreamResponse.FromString(m) for m in outcome.messages]
        if (
            case.cancel_after is not None
            and len(chunks) <= case.cancel_after
            and not (chunks and chunks[-1].finish_reason)
        ):
            return  # cancelled on our side before the end; grpc may still report OK
        assert chunks, f"{context}: an empty stream"
        assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1]), context
        finish, usage = chunks[-1].finish_reason, chunks[-1].usage
        assert len(chunks) == usage.completion_tokens, f"{context}: {len(chunks)} messages, usage {usage}"
    request = pb.GenerateRequest.FromString(case.data)
    max_tokens = request.max_tokens if request.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    assert finish in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH), f"{context}: finish {finish}"
    assert 1 <= usage.completion_tokens <= max_tokens, f"{context}: usage {usage}"
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, f"{context}: usage {usage}"
    assert usage.total_tokens <= limits.max_total_tokens, f"{context}: usage {usage}"


class Tally:
    """Requests by kind and status code, for the report `make stress` writes."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def add(self, kind: str, code: grpc.StatusCode) -> None:
        with self._lock:
            self.counts[(kind, code.name)] += 1

    def by_code(self) -> dict[str, int]:
        totals: Counter[str] = Counter()
        for (_, code), count in self.counts.items():
            totals[code] += count
        return dict(totals.most_common())

    def as_json(self) -> dict[str, Any]:
        kinds: dict[str, dict[str, int]] = {}
        for (kind, code), count in sorted(self.counts.items()):
            kinds.setdefault(kind, {})[code] = count
        return {"requests": sum(self.counts.values()), "by_code": self.by_code(), "by_kind": kinds}
