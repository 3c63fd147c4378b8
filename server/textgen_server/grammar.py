"""Grammar-constrained decoding with llguidance: JSON mode and tool calls that cannot be invalid.

`GrammarCompiler` (one per server: the model's tokenizer as llguidance sees it, and a thread pool)
turns a request's `response_format` or tools into a `Grammar`, a compiled matcher that is never
advanced; a bad schema fails there, in validation, naming the field. Each generation starts its own
`GrammarState` from it (a copy of the matcher), which gives the tokens allowed next as a mask for
`TokenChooser.choose` (sampling.py applies it after the penalties, before temperature, top-k and
top-p) and consumes the token chosen. When the grammar is complete the state is `finished` and the
generation stops; EOS is allowed only where the grammar accepts.

`prefetch_token_masks` computes the masks of one step's constrained rows in a single parallel call
(llguidance's `LLExecutor`) on a background thread, so that it overlaps the forward pass the
scheduler runs meanwhile (llguidance and ONNX Runtime both release the GIL); each state waits for
its mask when sampling asks for it. Rows without a grammar are skipped and pay nothing. A state whose
mask was not prefetched computes it alone when asked, so correctness never depends on the batch call.

Greedy rows skip most masks: the best token overall is the answer whenever the grammar allows it,
and `GrammarState.allows` asks the matcher about that one token (under a microsecond) where a mask
costs up to a tenth of a millisecond a row (inside a string with a length bound). They are never
prefetched: a greedy row computes its mask after the pass, alone, only when the grammar refuses its
best token or forces bytes (the mask keeps only the canonical tokens of forced text). On 2 cores
this measured faster than prefetching the forced rows' masks (0.90-0.94x of no schema at 16 streams
with bounded strings, against 0.88-0.92x), whose thread took its time from the forward pass.

The grammars (Lark, with llguidance's `%json` for schemas):

    JSON mode    start: " "? value                value: %json {schema}
    tool calls   start: calls | TEXT  (auto)       calls: " "? %json {array of calls}
                 start: calls         (required or one function)

A call's arguments travel in a google.protobuf.Struct, whose numbers are doubles: a numeric schema
in a tool's parameters that leaves a side unbounded is bounded there at 2^53 - 1, and a value it
leaves open ({}, an array without items, an object's unlisted properties) is any JSON with numbers
so bounded (`_within_struct`).

JSON is compact (no whitespace between tokens: with free whitespace a weak model can spend its
whole budget on spaces and newlines), and may follow one space, because this tokenizer writes the
start of an answer as `▁{` / `▁[` (a bare JSON grammar would refuse those tokens).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np
import numpy.typing as npt

from .tools import CALL_OPENING, WHITESPACE, ToolChoice, ToolSpec

__all__ = [
    "Grammar",
    "GrammarCompiler",
    "GrammarError",
    "GrammarState",
    "OutputConstraint",
    "fill_token_masks",
    "prefetch_token_masks",
]

BoolArray = npt.NDArray[np.bool_]
BitMask = npt.NDArray[np.int32]  # [words]: bit i of word j allows token 32 * j + i

# Compact JSON: the separators without spaces, and no whitespace anywhere else.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
_MAX_ERROR_CHARS = 200
# How llguidance says a consumed token was not allowed: only a bug here consumes one (every token
# chosen is one the grammar allows). Its other failures are its limits.
_REFUSED_TOKEN = "doesn't satisfy the grammar"


class GrammarError(ValueError):
    """A schema or tool definition llguidance cannot compile; `field` names it as the API spells it."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


class Grammar:
    """A compiled grammar; never advanced itself, each generation starts a state of its own."""

    def __init__(self, matcher: llguidance.LLMatcher, compiler: GrammarCompiler, field: str) -> None:
        self._matcher = matcher
        self._compiler = compiler
        self.field = field  # the request field it was compiled from, as the API spells it

    def start(self, *, greedy: bool = False) -> GrammarState:
        """A state of its own; `greedy`: its generation takes the best token whenever the grammar
        allows it, so it needs a mask only where the grammar refuses that token (`allows`)."""
        return GrammarState(self._matcher.deep_copy(), self._compiler, greedy=greedy, field=self.field)


@dataclass(frozen=True)
class OutputConstraint:
    """What a request's output must be: its grammar, and whether the output is tool calls (with
    `text_allowed`: text or calls) rather than the response itself (JSON mode)."""

    grammar: Grammar
    tool_calls: bool = False
    text_allowed: bool = False


class GrammarState:
    """One generation's position in its grammar: the allowed-token mask, and the tokens consumed."""

    def __init__(
        self, matcher: llguidance.LLMatcher, compiler: GrammarCompiler, *, field: str, greedy: bool = False
    ) -> None:
        self._matcher = matcher
        self._compiler = compiler
        self.greedy = greedy
        self.field = field  # the request field the grammar came from
        self._bitmask: BitMask | None = None  # [words] for the current position, once computed
        self._pending: Future[None] | None = None  # a prefetch computing _bitmask on another thread

    @property
    def finished(self) -> bool:
        """The grammar is complete: nothing more can follow (EOS is implied)."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str | None:
        """Why the matcher failed (a limit hit during generation, or a bug); None while it works."""
        return _short(self._matcher.get_error()) if self._matcher.is_error() else None

    @property
    def gave_up(self) -> bool:
        """The matcher failed on one of llguidance's limits: the schema is too complex to follow this
        far (a pattern of 100,000 repetitions builds its lexer only once its string starts). Not
        on a token it refused, which only a bug here would have chosen."""
        return self._matcher.is_error() and _REFUSED_TOKEN not in self._matcher.get_error()

    def allowed_mask(self) -> BoolArray:
        """bool [vocab]: True where a token may come next. After an error only EOS is allowed, so
        that the generation ends there."""
        if self._pending is not None:  # the matcher is not to be touched until the prefetch is done
            pending, self._pending = self._pending, None
            pending.result()  # raises what the batched call raised
        if self._bitmask is None:
            bitmask = self._compiler.new_bitmask(1)  # [1, words]
            llg_numpy.fill_next_token_bitmask(self._matcher, bitmask)
            self._bitmask = bitmask[0]
        vocab = self._compiler.vocab_size
        if self._matcher.is_error():
            only_eos = np.zeros(vocab, dtype=np.bool_)
            only_eos[self._compiler.eos_id] = True
            return only_eos
        bits = np.unpackbits(self._bitmask.view(np.uint8), count=vocab, bitorder="little")  # [vocab] 0/1
        mask: BoolArray = bits.view(np.bool_)
        return mask

    @property
    def has_mask(self) -> bool:
        """The mask of this position is computed, or being computed by a prefetch."""
        return self._bitmask is not None or self._pending is not None

    def allows(self, token_id: int) -> bool:
        """`allowed_mask()[token_id]`, without computing the mask where llguidance can say it more
        cheaply: where the grammar forces no bytes, a token is allowed exactly when the matcher would
        consume it. Where bytes are forced the mask is narrower (it keeps their canonical
        tokenization only, while the matcher consumes any spelling of them), so the mask decides."""
        if not self.has_mask and not self._matcher.is_stopped() and not self._forced():
            return bool(self._matcher.validate_tokens([token_id]) == 1)
        return bool(self.allowed_mask()[token_id])

    def _forced(self) -> bool:
        """The grammar allows only one continuation here for at least one byte."""
        return bool(self._matcher.compute_ff_bytes())

    @property
    def _wants_mask(self) -> bool:
        """The next mask is worth computing ahead of the logits: a sampled row needs it every step; a
        greedy row asks `allows` first and computes its mask only when refused."""
        return not self.has_mask and not self._matcher.is_stopped() and not self.greedy

    def advance(self, token_id: int) -> None:
        """Consume the token chosen (one the mask allowed; anything else puts the matcher in error)."""
        self._matcher.consume_token(token_id)
        self._bitmask = None


class _Constrained(Protocol):
    """What `fill_token_masks` needs of a row: its grammar state, if any (a Generation)."""

    @property
    def grammar(self) -> GrammarState | None: ...


def prefetch_token_masks(rows: Iterable[_Constrained]) -> None:
    """Start computing the next-token masks of every sampled constrained row, in one parallel call
    on a background thread; rows without a grammar are skipped, and so are greedy rows (see the
    module docstring). Call it once per step, before the forward
    pass whose logits the masks apply to, and touch no row's grammar until its `allowed_mask`."""
    states = _needing_masks(rows)
    if not states:
        return
    pending = states[0]._compiler.prefetcher.submit(_fill, states)
    for state in states:
        state._pending = pending


def fill_token_masks(rows: Iterable[_Constrained]) -> None:
    """`prefetch_token_masks`, on the caller's thread: compute the masks now."""
    states = _needing_masks(rows)
    if states:
        _fill(states)


def _needing_masks(rows: Iterable[_Constrained]) -> list[GrammarState]:
    return [row.grammar for row in rows if row.grammar is not None and row.grammar._wants_mask]


def _fill(states: Sequence[GrammarState]) -> None:
    compiler = states[0]._compiler
    bitmask = compiler.new_bitmask(len(states))  # [rows, words]
    llg_numpy.fill_next_token_bitmask_par(
        compiler.executor, [(state._matcher, row) for row, state in enumerate(states)], bitmask
    )
    for row, state in enumerate(states):
        state._bitmask = bitmask[row]


class GrammarCompiler:
    """Compiles requests' grammars against the model's tokenizer; one per server."""

    def __init__(
        self, tokenizer_json: str, *, eos_id: int, vocab_size: int, threads: int | None = None
    ) -> None:
        # n_vocab: the model's logits width, which may exceed the tokenizer's vocabulary.
        self._tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos_id)
        self._limits = llguidance.LLParserLimits(verbose_errors=False)  # errors quote no grammar
        self.executor = llguidance.LLExecutor(threads)  # the pool the masks are computed on
        # One thread that hands a step's masks to the executor while the forward pass runs.
        self.prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="textgen-masks")
        self.eos_id = eos_id
        self.vocab_size = vocab_size
        self._words = (vocab_size + 31) // 32

    @classmethod
    def from_file(cls, path: Path | str, *, eos_id: int, vocab_size: int) -> GrammarCompiler:
        """From a model directory's tokenizer.json (about 0.3 s for a 32000-token vocabulary)."""
        return cls(Path(path).read_text(encoding="utf-8"), eos_id=eos_id, vocab_size=vocab_size)

    def json_schema(self, schema: Mapping[str, Any] | None, field: str) -> Grammar:
        """JSON mode: an object matching `schema` (None: any JSON object)."""
        if schema is not None:
            _check_exact_numbers(schema, field)
        body = _compact_schema(schema if schema is not None else {"type": "object"})
        return self._compile(f'start: " "? value\nvalue: %json {body}\n', field)

    def tool_calls(self, tools: Sequence[ToolSpec], choice: ToolChoice, field: str) -> Grammar:
        """Calls of the tools `choice` offers (see tools.py for the format), or, when the choice
        allows text (auto), text that neither starts like a call nor contains one."""
        # Each tool's arguments schema sits under the root's $defs, its own "#..." references
        # rebased there: they point into the tool's parameters (pydantic's "#/$defs/Model"), not
        # into this array of calls. The open value its open values refer to sits beside them.
        offered = choice.offered(tools)
        arguments = {f"arguments_{index}": _arguments_schema(tool) for index, tool in enumerate(offered)}
        defs = {
            key: _within_struct(_rebase_refs(schema, f"#/$defs/{key}")) for key, schema in arguments.items()
        }
        defs[_OPEN_VALUE] = _OPEN_VALUE_SCHEMA
        items = [
            {
                "type": "object",
                "properties": {"name": {"const": tool.name}, "arguments": {"$ref": f"#/$defs/{key}"}},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for key, tool in zip(arguments, offered, strict=True)
        ]
        calls = _compact_schema({"type": "array", "minItems": 1, "items": {"anyOf": items}, "$defs": defs})
        lark = f'calls: " "? %json {calls}\n'
        if choice.text_allowed:
            blank = f"[{_regex_class(WHITESPACE)}]"
            opening = "".join(f"\\{c}" if c in "[{" else c for c in CALL_OPENING)
            lark = (
                "start: calls | TEXT\n"
                + lark
                + f"TEXT: (/{blank}*[^{_regex_class(WHITESPACE)}\\[](?s:.*)/ | /{blank}*/)"
                + f" & ~/(?s:.*){opening}(?s:.*)/\n"
            )
        else:
            lark = "start: calls\n" + lark
        try:
            return self._compile(lark, field)
        except GrammarError as exc:
            # A pointer as the tool's author wrote it ('/$defs/Place'), not as rebased above.
            raise GrammarError(field, _REBASED_POINTER.sub("", exc.description)) from None

    def new_bitmask(self, rows: int) -> BitMask:
        """int32 [rows, words], every token allowed until filled."""
        return llg_numpy.allocate_token_bitmask(rows, self.vocab_size)

    def _compile(self, lark: str, field: str) -> Grammar:
        matcher = llguidance.LLMatcher(
            self._tokenizer, llguidance.LLMatcher.grammar_from_lark(lark), log_level=0, limits=self._limits
        )
        if matcher.is_error():
            raise GrammarError(field, _short(matcher.get_error()))
        return Grammar(matcher, self, field)


def _arguments_schema(tool: ToolSpec) -> dict[str, Any]:
    """A tool's parameters as the schema of its `arguments` object. Unless the tool says otherwise,
    no property beyond those it lists (as text-generation-inference does): a model should not invent
    arguments. Not where the object is defined elsewhere ($ref, allOf, ...): beside those,
    additionalProperties would see no properties and forbid every one."""
    schema: dict[str, Any] = dict(tool.parameters) if tool.parameters is not None else {"type": "object"}
    schema.setdefault("type", "object")
    if not _COMPOSED.intersection(schema):
        schema.setdefault("additionalProperties", False)
    return schema


# A response carries a call's arguments as a google.protobuf.Struct, whose numbers are doubles: within
# I-JSON's interoperable range (RFC 7493) every integer is exact, and no number overflows to infinity
# (which the Struct's JSON form cannot even write). llguidance writes a bounded number without an
# exponent: 0.0000001, never 1e-7.
SAFE_INTEGER = 2**53 - 1
_NUMERIC_TYPES = frozenset({"integer", "number"})
# Any JSON value a Struct carries exactly, for a value a tool's schema leaves open: left to itself,
# llguidance writes any JSON there, 1e999 included. One definition beside the tools' arguments in the
# grammar's $defs, referenced wherever a value is open (a recursive schema: arrays and objects of it).
_OPEN_VALUE = "struct_value"
_OPEN_VALUE_REF = {"$ref": f"#/$defs/{_OPEN_VALUE}"}
_JSON_TYPES = ("null", "boolean", "string", "number", "array", "object")
_OPEN_VALUE_SCHEMA = {
    "type": list(_JSON_TYPES),
    "minimum": -SAFE_INTEGER,
    "maximum": SAFE_INTEGER,
    "items": _OPEN_VALUE_REF,
    "additionalProperties": _OPEN_VALUE_REF,
}
# Keywords whose value is a schema, or a list of them (items: either, by the draft).
_SUBSCHEMAS = frozenset(
    {
        "items", "prefixItems", "additionalItems", "contains", "unevaluatedItems",
        "additionalProperties", "unevaluatedProperties", "propertyNames",
        "allOf", "anyOf", "oneOf", "not", "if", "then", "else",
    }
)  # fmt: skip
# Keywords that say what a value may be; a schema with none of them takes any JSON.
_DEFINING = frozenset({"type", "$ref", "const", "enum", "allOf", "anyOf", "oneOf", "not", "if"})


def _within_struct(schema: Any) -> Any:
    """`schema` (a tool's arguments, or a schema inside them) with every value it leaves open made
    `_OPEN_VALUE` and every numeric schema that leaves a side unbounded bounded at -/+SAFE_INTEGER on
    that side (bounds it sets stay as they are): what it accepts is unchanged but for numbers past
    what a double holds exactly. Open is `true`, a schema that defines no type (`{}`, a bare
    description), an array's items and an object's unlisted properties when not given."""
    if schema is True:
        return dict(_OPEN_VALUE_REF)
    if not isinstance(schema, dict):
        return schema  # false, or not a schema: llguidance judges it
    walked: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            walked[key] = {name: _within_struct(schema_) for name, schema_ in value.items()}
        elif key in _SUBSCHEMAS:
            walked[key] = (
                [_within_struct(s) for s in value] if isinstance(value, list) else _within_struct(value)
            )
        else:
            walked[key] = value  # data (const, enum, default) or a keyword's setting
    if not _DEFINING.intersection(schema):
        walked["type"] = list(_JSON_TYPES)  # the keywords it has still apply to their own type
    types = walked.get("type")
    types = set(types) if isinstance(types, list) else {types}
    if _NUMERIC_TYPES.intersection(types):
        low = _bound(schema, "minimum", "exclusiveMinimum")
        high = _bound(schema, "maximum", "exclusiveMaximum")
        # Never past the schema's own bound on the other side: that would leave no number at all.
        if low is _UNSET and not (isinstance(high, (int, float)) and high <= -SAFE_INTEGER):
            walked["minimum"] = -SAFE_INTEGER
        if high is _UNSET and not (isinstance(low, (int, float)) and low >= SAFE_INTEGER):
            walked["maximum"] = SAFE_INTEGER
    if "array" in types:
        walked.setdefault("items", dict(_OPEN_VALUE_REF))  # after prefixItems, if any
    if "object" in types:
        walked.setdefault("additionalProperties", dict(_OPEN_VALUE_REF))
    return walked


_UNSET = object()
# llguidance holds a schema's const and enum values as doubles and its bounds as 64-bit integers: a
# const of 2^53 + 1 made it write 2^53, a minimum of 2^64 or 1e19 for an integer 2^63 - 1, an
# answer the schema does not accept.
_BOUNDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})
_INT64_MAX = 2**63 - 1


def _check_exact_numbers(schema: Any, field: str, pointer: str = "") -> None:
    """GrammarError naming the first const or enum number past +/-SAFE_INTEGER, or bound past
    +/-(2^63 - 1), in `schema` (a JSON mode schema), which llguidance would constrain to another
    number (tools need no such check: their schemas are bounded at SAFE_INTEGER, `_within_struct`)."""
    if not isinstance(schema, dict):
        return
    for key, value in schema.items():
        where = f"{pointer}/{key}"
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            for name, inner in value.items():
                _check_exact_numbers(inner, field, f"{where}/{name}")
        elif key in _SUBSCHEMAS and isinstance(value, list):
            for index, inner in enumerate(value):
                _check_exact_numbers(inner, field, f"{where}/{index}")
        elif key in _SUBSCHEMAS:
            _check_exact_numbers(value, field, where)
        elif key in ("const", "enum"):
            number = _first_number_past(value, SAFE_INTEGER)
            if number is not None:
                raise GrammarError(
                    field,
                    f"{where}: {_shown(number)} is past +/-(2^53 - 1), the largest numbers JSON mode writes "
                    "exactly in a const or enum",
                )
        elif key in _BOUNDS and _first_number_past(value, _INT64_MAX) is not None:
            raise GrammarError(
                field, f"{where}: {_shown(value)} is past +/-(2^63 - 1), the largest bound JSON mode can hold"
            )


def _shown(number: float) -> str:
    text = repr(number)
    return text if len(text) <= 32 else f"a number of {len(text)} digits"


def _first_number_past(value: Any, limit: int) -> int | float | None:
    """The first number in JSON data `value` whose magnitude is past `limit` (booleans are not numbers)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value if abs(value) > limit else None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for item in items:
        found = _first_number_past(item, limit)
        if found is not None:
            return found
    return None


def _bound(schema: Mapping[str, Any], inclusive: str, exclusive: str) -> Any:
    """The schema's bound on one side (whatever it holds: llguidance judges it), or _UNSET."""
    return schema.get(inclusive, schema.get(exclusive, _UNSET))


# Where `tool_calls` places each tool's parameters, as llguidance's error pointers show it.
_REBASED_POINTER = re.compile(r"/\$defs/arguments_\d+")
# Keywords that define an object by other schemas.
_COMPOSED = frozenset({"$ref", "allOf", "anyOf", "oneOf"})
# Keywords whose values are JSON data, not schemas: a "$ref" key inside them is not a reference.
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})
# Keywords whose values map names to schemas: a property may be called "default" or "$ref".
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})


def _rebase_refs(schema: Any, base: str) -> Any:
    """`schema` with each local reference ("#", "#/$defs/X": relative to its own root) made
    relative to `base`, the JSON pointer where it is placed."""
    if isinstance(schema, list):
        return [_rebase_refs(item, base) for item in schema]
    if not isinstance(schema, dict):
        return schema
    rebased: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            rebased[key] = base + value[1:]
        elif key in _DATA_KEYWORDS:
            rebased[key] = value
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            rebased[key] = {name: _rebase_refs(schema_, base) for name, schema_ in value.items()}
        else:
            rebased[key] = _rebase_refs(value, base)
    return rebased


def _compact_schema(schema: Mapping[str, Any]) -> str:
    """The schema for `%json`, with llguidance's options for compact JSON in place of any of its own."""
    return json.dumps({**schema, "x-guidance": _JSON_OPTIONS}, ensure_ascii=False)


def _regex_class(chars: str) -> str:
    """The body of a regex character class holding exactly `chars` (whitespace here)."""
    return "".join({" ": " ", "\t": "\\t", "\n": "\\n", "\r": "\\r"}[c] for c in chars)


def _short(message: str) -> str:
    """llguidance's error without the grammar it quotes: 'at 2(8): failed to compile JSON schema:
    Invalid type: strin\\n   1 | start: ...' → 'Invalid type: strin'."""
    first = message.split("\n   1 |", 1)[0].strip()
    for prefix in ("failed to compile JSON schema: ",):
        if prefix in first:
            first = first.split(prefix, 1)[1]
    first = " ".join(first.split())
    return first if len(first) <= _MAX_ERROR_CHARS else first[: _MAX_ERROR_CHARS - 1] + "…"
