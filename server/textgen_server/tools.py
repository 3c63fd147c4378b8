"""Function calling for a model without tool tokens: the call format, its prompt text, and the splitter
that keeps calls out of the response.

Mistral-7B-Instruct-v0.2's v1 chat format has no tool tokens, so tools are written into the prompt as
text (text-generation-inference's default tool template does the same) and the answer is constrained
by a grammar (`grammar.py`) to either text or calls in one format, Mistral's own:

    [{"name":"get_weather","arguments":{"city":"Paris"}}]

a JSON array of one or more calls, compact (no whitespace between tokens), optionally after one
space. Text can never start with `[` or contain `[{"name"`, so the first non-blank character
decides between the two, and a response never holds call JSON.

Everything JSON here is written compactly (`dumps`): the tool list in the prompt, earlier calls
replayed from the conversation, and the calls the grammar allows, so that the model sees exactly
the format it has to produce.

JSON from a request (call messages, tool results) is measured before it is parsed: json's scanner
recurses once per level, so a few kilobytes of `[` raised RecursionError out of the handler.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .excerpt import excerpt

__all__ = [
    "CALL_OPENING",
    "MAX_ARGUMENTS_DEPTH",
    "MAX_JSON_DEPTH",
    "RESULTS_HEADER",
    "WHITESPACE",
    "CallSplitter",
    "ToolCall",
    "ToolChoice",
    "ToolChoiceMode",
    "ToolSpec",
    "dumps",
    "json_depth",
    "parse_call_message",
    "render_calls",
    "render_results",
    "tools_prompt",
]

# JSON from a request nested deeper than this is not parsed (a call message is then text, a tool
# result a string): far below where json.loads and json.dumps exhaust Python's recursion limit.
MAX_JSON_DEPTH = 64
# How deep a call's arguments (the object itself is level 1) may nest in a response: they travel as
# a google.protobuf.Struct, three levels of protobuf per JSON object, and upb decodes 100 at most.
MAX_ARGUMENTS_DEPTH = 33
# A JSON string, or an unterminated one to the end of the text: every match succeeds where it starts,
# so the scan is linear (a pattern that needs the closing quote retried each quote inside an
# unterminated string to its end, quadratic: 6 KB took 0.1 s, holding the GIL).
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\[\s\S][^"\\]*)*(?:"|\\?\Z)')

# What may precede a call (besides one space) and what no text may begin with: the grammar's text
# rule and the splitter below must agree on it exactly.
WHITESPACE = " \t\n\r"
CALL_OPENING = '[{"name"'  # text never contains it, so call JSON never reaches the response

TOOLS_HEADER = "You can call these functions:"
RESULTS_HEADER = "Function results:"
_CALL_FORMAT = '[{"name":"<function name>","arguments":{<its arguments>}}]'


def dumps(value: Any) -> str:
    """Compact JSON, the one form the prompt and the grammar use (no whitespace between tokens)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call; `parameters` is the JSON Schema of its arguments (an object)."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] | None = None

    def prompt_entry(self) -> dict[str, Any]:
        """How the prompt lists it: the flat form, whatever form the request used."""
        entry: dict[str, Any] = {"name": self.name}
        if self.description:
            entry["description"] = self.description
        if self.parameters is not None:
            entry["parameters"] = dict(self.parameters)
        return entry


class ToolChoiceMode(enum.Enum):
    AUTO = "auto"  # text or calls
    NONE = "none"  # text only; the tools are not offered
    REQUIRED = "required"  # one or more calls
    FUNCTION = "function"  # calls of the one named function


@dataclass(frozen=True)
class ToolChoice:
    mode: ToolChoiceMode = ToolChoiceMode.AUTO
    name: str = ""  # FUNCTION only

    def offered(self, tools: Sequence[ToolSpec]) -> list[ToolSpec]:
        """The tools the prompt lists and the grammar allows."""
        if self.mode is ToolChoiceMode.NONE:
            return []
        if self.mode is ToolChoiceMode.FUNCTION:
            return [tool for tool in tools if tool.name == self.name]
        return list(tools)

    @property
    def text_allowed(self) -> bool:
        return self.mode in (ToolChoiceMode.AUTO, ToolChoiceMode.NONE)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


def tools_prompt(tools: Sequence[ToolSpec], choice: ToolChoice) -> str:
    """The block appended to the last user turn: the tools, then how to call them ("" if none)."""
    offered = choice.offered(tools)
    if not offered:
        return ""
    if choice.mode is ToolChoiceMode.AUTO:
        how = (
            f"To call one or more of them, reply with nothing but a JSON array of calls: {_CALL_FORMAT}. "
            "Otherwise, answer in plain text."
        )
    elif choice.mode is ToolChoiceMode.REQUIRED:
        how = f"Reply with nothing but a JSON array of one or more calls: {_CALL_FORMAT}."
    else:
        call = f'[{{"name":{dumps(choice.name)},"arguments":{{<its arguments>}}}}]'
        how = f"Reply with nothing but a JSON array of calls of {choice.name}: {call}."
    return f"{TOOLS_HEADER}\n{dumps([tool.prompt_entry() for tool in offered])}\n{how}"


def render_calls(calls: Sequence[ToolCall]) -> str:
    """An assistant turn that made these calls, exactly as the grammar would have produced it."""
    return dumps([{"name": call.name, "arguments": call.arguments} for call in calls])


def render_results(results: Sequence[tuple[str, str]]) -> str:
    """A turn of (function name, result) pairs. A result that is JSON is inserted as JSON
    (compact), anything else as a JSON string."""
    entries = [{"name": name, "result": _json_or_text(content)} for name, content in results]
    return f"{RESULTS_HEADER}\n{dumps(entries)}"


def parse_call_message(content: str) -> list[ToolCall] | None:
    """The calls an assistant message holds, or None when it is text.

    A call message is the JSON of one call, {"name": ..., "arguments": {...}} (what Workers AI's
    runWithTools sends back), or an array of them (what this server generates).
    """
    stripped = content.strip(WHITESPACE)
    if not stripped.startswith(("{", "[")):
        return None
    value = _json_or_text(stripped)  # starting with { or [: a list or dict once parsed
    if isinstance(value, str):
        return None
    items = value if isinstance(value, list) else [value]
    calls = [_call(item) for item in items]
    if not items or any(call is None for call in calls):
        return None
    return [call for call in calls if call is not None]


def _call(value: object) -> ToolCall | None:
    if (
        isinstance(value, dict)
        and set(value) == {"name", "arguments"}
        and isinstance(value["name"], str)
        and value["name"]
        and isinstance(value["arguments"], dict)
    ):
        return ToolCall(value["name"], value["arguments"])
    return None


def _json_or_text(content: str) -> Any:
    """`content` parsed, or itself where it is not JSON or nests past MAX_JSON_DEPTH."""
    if json_depth(content) > MAX_JSON_DEPTH:
        return content
    try:
        return json.loads(content)
    except ValueError:
        return content


def json_depth(text: str) -> int:
    """How deep `text`'s arrays and objects nest, brackets inside strings not counted: 0 for a
    scalar, 1 for [1, 2], 2 for [{"a": 1}]."""
    bare = np.frombuffer(_JSON_STRING.sub("", text).encode("utf-8"), dtype=np.uint8)
    opens = (bare == ord("[")) | (bare == ord("{"))
    closes = (bare == ord("]")) | (bare == ord("}"))
    return int(np.cumsum(opens.astype(np.int64) - closes).max(initial=0))


class _Route(enum.Enum):
    UNDECIDED = "undecided"
    TEXT = "text"
    CALLS = "calls"


class CallSplitter:
    """Splits a tool-enabled generation's text into the response and the calls.

    The grammar lets the answer be text or calls, decided by its first non-blank character (`[`
    starts calls). Until that character arrives the text is held back; then text flows on and call
    text is kept here, to be parsed into `calls` when generation ends. With `calls_only` (tool_choice
    required or a function) there is nothing to decide.
    """

    def __init__(self, calls_only: bool) -> None:
        self._route = _Route.CALLS if calls_only else _Route.UNDECIDED
        self._held: list[str] = []
        self.calls: tuple[ToolCall, ...] = ()
        self.error: str | None = None  # after the final push: calls no response could carry

    def push(self, delta: str, final: bool = False) -> str:
        """Text for the response from this delta; `final` on the last one. After the final push,
        `calls` holds the calls (none when generation stopped inside them, e.g. at max_tokens)."""
        if self._route is _Route.TEXT:
            return delta
        self._held.append(delta)
        if self._route is _Route.UNDECIDED:
            held = "".join(self._held)
            first = held.lstrip(WHITESPACE)[:1]
            if first == "[":
                self._route = _Route.CALLS
            elif first or final:
                self._route = _Route.TEXT
                self._held = []
                return held
        if final and self._route is _Route.CALLS:
            text = "".join(self._held)
            # The array and the call object around the arguments: two levels more.
            depth = json_depth(text) - 2
            if depth > MAX_ARGUMENTS_DEPTH:
                self.error = (
                    f"a tool call's arguments nest {depth} levels deep; a response carries at most "
                    f"{MAX_ARGUMENTS_DEPTH} (protobuf's depth limit)"
                )
            else:
                try:
                    self.calls = tuple(_parse_generated_calls(text))
                except _BeyondDouble as exc:
                    self.error = (
                        f"a tool call's arguments hold the number {excerpt(exc.text)}, beyond a double"
                    )
        return ""


class _BeyondDouble(Exception):
    """A JSON number past a double's range (1e999, or an integer of 400 digits): no response can
    carry it. The grammar writes none (grammar.py bounds every number in a call's arguments); this
    is the check should one get past it. Not a ValueError, which json.loads would take for text cut
    short."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _BeyondDouble(text)
    return value


def _int_within_double(text: str) -> int:
    try:
        value = int(text)
        float(value)
    except (OverflowError, ValueError) as exc:  # ValueError: past Python's 4300-digit limit
        raise _BeyondDouble(text) from exc
    return value


def _parse_generated_calls(text: str) -> list[ToolCall]:
    """The calls in the generated text; raises _BeyondDouble for a number no double holds."""
    try:
        value = json.loads(text, parse_float=_finite_float, parse_int=_int_within_double)
    except ValueError:  # cut short (max_tokens): no call is reported rather than a partial one
        return []
    if not isinstance(value, list):
        return []
    calls = [_call(item) for item in value]
    return [call for call in calls if call is not None]
