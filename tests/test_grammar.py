"""Grammar-constrained decoding without a model: the grammars made from schemas and tools, the
per-request state and its batched masks, and generations driven by random logits, whose output must
validate with jsonschema whatever the sampling parameters."""

# ruff: noqa: F811  (pytest fixtures are imported from tokenizer_fixtures and then requested by name)

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import llguidance
import numpy as np
import numpy.typing as npt
import pytest
from json_schemas import SCHEMAS
from textgen_server.generation import Generation, GenerationRequest, TokenEvent
from textgen_server.grammar import (
    Grammar,
    GrammarCompiler,
    GrammarError,
    GrammarState,
    OutputConstraint,
    _rebase_refs,
    _within_struct,
    fill_token_masks,
    prefetch_token_masks,
)
from textgen_server.sampling import SamplingParams, TokenChooser
from textgen_server.stopping import FinishReason
from textgen_server.tokenizer import Tokenizer
from textgen_server.tools import CALL_OPENING, MAX_ARGUMENTS_DEPTH, ToolChoice, ToolChoiceMode, ToolSpec
from tokenizer_fixtures import grammars, spm_model_path, tok, tokenizer_json  # noqa: F401  (fixtures)

ADD = ToolSpec(
    "add",
    "Adds two integers.",
    {
        "type": "object",
        "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99}, "y": {"type": "integer"}},
        "required": ["x", "y"],
    },
)
WEATHER = ToolSpec(
    "get_weather",
    "Current weather in a city.",
    {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
        "required": ["city"],
    },
)
TOOLS = [ADD, WEATHER]
# Parameters that reference definitions, as pydantic's model_json_schema() writes them (and the
# OpenAI SDK's pydantic_function_tool sends them): "#/$defs/Place" is relative to the parameters.
ROUTE = ToolSpec(
    "route",
    "Route between two places.",
    {
        "$defs": {
            "Place": {
                "additionalProperties": False,
                "properties": {
                    "city": {"maxLength": 12, "title": "City", "type": "string"},
                    "country": {"enum": ["FR", "DE"], "title": "Country", "type": "string"},
                },
                "required": ["city", "country"],
                "title": "Place",
                "type": "object",
            }
        },
        "properties": {"origin": {"$ref": "#/$defs/Place"}, "destination": {"$ref": "#/$defs/Place"}},
        "required": ["origin", "destination"],
        "title": "Route",
        "type": "object",
    },
)
AUTO, REQUIRED = ToolChoice(ToolChoiceMode.AUTO), ToolChoice(ToolChoiceMode.REQUIRED)
PERSON = SCHEMAS["person"]


@pytest.fixture(scope="module")
def raw_tokens(tokenizer_json: Path) -> llguidance.LLTokenizer:
    """Tokenizes text as generated (no dummy-prefix space in front), e.g. '{' alone."""
    return llguidance.LLTokenizer(tokenizer_json.read_text(encoding="utf-8"), eos_token=2)


def accepts(grammar: Grammar, ids: list[int]) -> tuple[bool, bool]:
    """(every token was allowed when it came, the grammar was complete after the last one)."""
    state = grammar.start()
    for token in ids:
        if not state.allowed_mask()[token]:
            return False, False
        state.advance(token)
        assert state.error is None
    return True, state.finished


SAFE_INTEGER = 2**53 - 1


@pytest.mark.parametrize("schema", [{"const": SAFE_INTEGER}, {"enum": ["a", -SAFE_INTEGER]}, {"const": 0.5}])
def test_json_mode_writes_a_const_or_enum_number_up_to_2_53_exactly(
    grammars: GrammarCompiler, raw_tokens: llguidance.LLTokenizer, schema: dict[str, Any]
) -> None:
    grammar = grammars.json_schema(schema, "response_format.json_schema")
    number = schema.get("const", schema.get("enum", [None, None])[-1])
    assert accepts(grammar, raw_tokens.tokenize_str(json.dumps(number))) == (True, True)


def test_llguidance_writes_a_const_past_2_53_as_the_nearest_double(
    grammars: GrammarCompiler, raw_tokens: llguidance.LLTokenizer
) -> None:
    """Why JSON mode refuses such a number: compiled, it would make the model write another one
    (when llguidance writes them exactly, this fails and the check can go)."""
    lark = f'start: " "? value\nvalue: %json {json.dumps({"const": 2**53 + 1})}\n'
    grammar = grammars._compile(lark, "response_format.json_schema")
    assert accepts(grammar, raw_tokens.tokenize_str(str(2**53 + 1))) == (False, False)
    assert accepts(grammar, raw_tokens.tokenize_str(str(2**53))) == (True, True)


def test_json_mode_takes_bounds_up_to_2_63_and_properties_named_like_keywords(
    grammars: GrammarCompiler, raw_tokens: llguidance.LLTokenizer
) -> None:
    bounded = grammars.json_schema(
        {"type": "integer", "minimum": 2**62, "maximum": 2**63 - 1}, "response_format.json_schema"
    )
    assert accepts(bounded, raw_tokens.tokenize_str(str(2**63 - 1))) == (True, True)
    named = {"type": "object", "properties": {"const": {"type": "integer", "maximum": 2**60}}}
    grammars.json_schema(named, "response_format.json_schema")


def test_json_mode_is_compact_json_after_an_optional_space(
    grammars: GrammarCompiler, raw_tokens: llguidance.LLTokenizer
) -> None:
    grammar = grammars.json_schema(PERSON, "response_format.json_schema")
    assert accepts(grammar, raw_tokens.tokenize_str('{"name":"Ada","age":36}')) == (True, True)
    assert accepts(grammar, raw_tokens.tokenize_str(' {"name":"Ada","age":36}')) == (True, True)
    assert accepts(grammar, raw_tokens.tokenize_str('{"name":"Ada"')) == (True, False)  # a prefix
    for wrong in (
        '{"name": "Ada","age":36}',  # free whitespace
        '{\n"name":"Ada","age":36}',
        '  {"name":"Ada","age":36}',  # more than one space before
        '{"name":"Ada","age":131}',  # out of bounds
        '{"name":"Ada","age":36,"x":1}',  # additionalProperties: false
        '{"age":36,"name":"Ada"}',  # properties come in the schema's order
        '{"name":"Ada and Grace, too","age":36}',  # maxLength
    ):
        assert accepts(grammar, raw_tokens.tokenize_str(wrong))[0] is False, wrong


def test_json_object_mode_takes_any_object(
    grammars: GrammarCompiler, raw_tokens: llguidance.LLTokenizer
) -> None:
    grammar = grammars.json_schema(None, "response_format")
    assert accepts(grammar, raw_tokens.tokenize_str('{"a":[1,{"b":null}],"c":"d"}')) == (True, True)
    assert accepts(grammar, raw_tokens.tokenize_str("[1]"))[0] is False


def test_eos_only_where_the_grammar_accepts(grammars: GrammarCompiler, tok: Tokenizer) -> None:
    state = grammars.json_schema(PERSON, "f").start()
    assert not state.allowed_mask()[tok.eos_id]
    auto = grammars.tool_calls(TOOLS, AUTO, "chat.tools").start()
    assert auto.allowed_mask()[tok.eos_id]  # an empty text answer is an answer
    required = grammars.tool_calls(TOOLS, REQUIRED, "chat.tools").start()
    assert not required.allowed_mask()[tok.eos_id]


CALLS = ' [{"name":"add","arguments":{"x":1,"y":-2}},{"name":"get_weather","arguments":{"city":"Paris"}}]'


@pytest.mark.parametrize(
    ("text", "auto", "required"),
    [
        (CALLS, (True, True), (True, True)),
        (CALLS.strip(), (True, True), (True, True)),
        ('[{"name":"get_weather","arguments":{"city":"Paris","unit":"f"}}]', (True, True), (True, True)),
        ("The weather is fine.", (True, False), (False, False)),  # text: complete only at EOS
        ("\n\nSure. Lists look like [1, 2].", (True, False), (False, False)),
        ("[1, 2] is a list", (False, False), (False, False)),  # text never starts like a call
        (" [not a call", (False, False), (False, False)),
        (f"Here: {CALL_OPENING}", (False, False), (False, False)),  # nor contains one
        ('[{"name":"mul","arguments":{}}]', (False, False), (False, False)),  # not a tool
        ('[{"name":"add","arguments":{"x":1}}]', (False, False), (False, False)),  # y is required
        ('[{"name":"add","arguments":{"x":1,"y":2,"z":3}}]', (False, False), (False, False)),  # no extras
        ('[{"name":"add","arguments":{"x":100,"y":2}}]', (False, False), (False, False)),  # maximum
        ('[{"arguments":{"x":1,"y":2},"name":"add"}]', (False, False), (False, False)),  # name first
        ("[]", (False, False), (False, False)),  # at least one call
    ],
)
def test_tool_call_grammar(
    grammars: GrammarCompiler,
    raw_tokens: llguidance.LLTokenizer,
    text: str,
    auto: tuple[bool, bool],
    required: tuple[bool, bool],
) -> None:
    ids = raw_tokens.tokenize_str(text)
    assert accepts(grammars.tool_calls(TOOLS, AUTO, "chat.tools"), ids) == auto
    assert accepts(grammars.tool_calls(TOOLS, REQUIRED, "chat.tools"), ids) == required


def test_a_named_function_is_the_only_call(
    grammars: GrammarCompiler, raw_tokens: llguidance.LLTokenizer
) -> None:
    grammar = grammars.tool_calls(TOOLS, ToolChoice(ToolChoiceMode.FUNCTION, "get_weather"), "chat.tools")
    assert accepts(
        grammar, raw_tokens.tokenize_str('[{"name":"get_weather","arguments":{"city":"Oslo"}}]')
    ) == (
        True,
        True,
    )
    assert accepts(grammar, raw_tokens.tokenize_str('[{"name":"add","arguments":{"x":1,"y":2}}]'))[0] is False
    assert accepts(grammar, raw_tokens.tokenize_str("Hello"))[0] is False


def test_call_arguments_are_numbers_a_struct_carries_exactly(
    grammars: GrammarCompiler, raw_tokens: llguidance.LLTokenizer
) -> None:
    measure = ToolSpec(
        "measure",
        parameters={
            "type": "object",
            "properties": {
                "n": {"type": "integer"},
                "x": {"type": ["number", "null"]},
                "big": {"type": "integer", "minimum": 0, "maximum": 10**17},  # its own bounds stay
                "xs": {"type": "array", "items": {"type": "number"}},
            },
            "required": ["n", "x", "big", "xs"],
        },
    )
    grammar = grammars.tool_calls([measure], REQUIRED, "chat.tools")

    def call(n: str, x: str, big: str = "1", xs: str = "0.5") -> tuple[bool, bool]:
        text = f'[{{"name":"measure","arguments":{{"n":{n},"x":{x},"big":{big},"xs":[{xs}]}}}}]'
        return accepts(grammar, raw_tokens.tokenize_str(text))

    safe = 2**53 - 1
    assert call(str(safe), "-0.0000001", str(10**16), "-2.5") == (True, True)
    assert call(str(-safe), "null") == (True, True)
    assert call(str(safe + 1), "1")[0] is False  # Struct's double would round it
    assert call(str(-safe - 1), "1")[0] is False
    assert call("1", "1e309")[0] is False  # infinity as a double
    assert call("1", "1", xs="5E+071597857")[0] is False
    assert call("1", "1", big=str(10**17 + 1))[0] is False
    # A bound past the safe range on one side leaves the other side open, not empty.
    above = ToolSpec(
        "above", parameters={"type": "object", "properties": {"n": {"type": "integer", "minimum": 10**16}}}
    )
    grammar = grammars.tool_calls([above], REQUIRED, "chat.tools")
    text = f'[{{"name":"above","arguments":{{"n":{10**16 + 5}}}}}]'
    assert accepts(grammar, raw_tokens.tokenize_str(text)) == (True, True)


# Values a schema leaves open, each where JSON Schema leaves it so: llguidance writes any JSON there.
OPEN = ToolSpec(
    "store",
    "Stores anything.",
    {
        "$defs": {"Blob": {"description": "anything at all"}},
        "type": "object",
        "properties": {
            "empty": {},
            "true": True,
            "described": {"description": "no type"},
            "list": {"type": "array"},
            "tuple": {"type": "array", "prefixItems": [{"type": "string"}]},
            "record": {"type": "object", "properties": {"id": {"type": "integer", "maximum": 9}}},
            "either": {"anyOf": [{"type": "string"}, {}]},
            "blob": {"$ref": "#/$defs/Blob"},
        },
        "additionalProperties": True,
    },
)


@pytest.mark.parametrize(
    ("name", "placed"),
    [
        ("empty", "VALUE"),
        ("true", "VALUE"),
        ("described", "VALUE"),
        ("list", "[1,VALUE]"),  # items
        ("tuple", '["a",VALUE]'),  # items after prefixItems
        ("record", '{"id":9,"x":VALUE}'),  # a nested object's unlisted property
        ("either", "VALUE"),
        ("blob", "VALUE"),
        ("unlisted", "VALUE"),  # additionalProperties: true
    ],
)
def test_open_values_in_call_arguments_are_json_a_struct_carries(
    grammars: GrammarCompiler, raw_tokens: llguidance.LLTokenizer, name: str, placed: str
) -> None:
    """Any JSON goes where the schema leaves a value open, but numbers only as far as a double holds
    integers exactly: before, `{"empty":1e999}` passed the grammar and ended the request INTERNAL."""
    grammar = grammars.tool_calls([OPEN], REQUIRED, "chat.tools")

    def call(value: str) -> tuple[bool, bool]:
        arguments = f'{{"{name}":{placed.replace("VALUE", value)}}}'
        return accepts(grammar, raw_tokens.tokenize_str(f'[{{"name":"store","arguments":{arguments}}}]'))

    safe = 2**53 - 1
    assert call(f'{{"a":[{{"b":-{safe}}},{safe},"s",null,false,0.5,[]]}}') == (True, True)
    assert call('"text"') == (True, True)
    for beyond in ("1e999", "-1e309", "1e5", str(safe + 1), f'{{"a":[{{"b":{-safe - 1}}}]}}', "[[1E3]]"):
        assert call(beyond)[0] is False, beyond


def test_only_schemas_are_opened_or_bounded_never_data_or_settings() -> None:
    open_value = {"$ref": "#/$defs/struct_value"}
    safe = 2**53 - 1
    schema = {
        "type": "object",
        "properties": {
            "flags": {"type": "array", "items": False, "uniqueItems": True, "default": {}},
            "choice": {"enum": [True, {}], "const": {}},
            "n": {"type": ["integer", "null"], "exclusiveMinimum": 0},
        },
        "dependentRequired": {"flags": ["n"]},
        "x-note": {"type": "number"},
    }
    assert _within_struct(schema) == {
        "type": "object",
        "properties": {
            "flags": {"type": "array", "items": False, "uniqueItems": True, "default": {}},
            "choice": {"enum": [True, {}], "const": {}},  # defined by its values: not open
            "n": {"type": ["integer", "null"], "exclusiveMinimum": 0, "maximum": safe},
        },
        "dependentRequired": {"flags": ["n"]},  # names, not schemas
        "x-note": {"type": "number"},  # not a keyword: nothing reads it
        "additionalProperties": open_value,
    }


@pytest.mark.parametrize("batched", [fill_token_masks, prefetch_token_masks])
def test_batched_masks_equal_masks_computed_alone(
    grammars: GrammarCompiler, raw_tokens: llguidance.LLTokenizer, batched: Any
) -> None:
    prefixes = ["", '{"name":"A', '{"name":"Ada","age":1', '{"name":"Ada","age":130']

    def state_at(prefix: str) -> GrammarState:
        state = grammars.json_schema(PERSON, "f").start()
        for token in raw_tokens.tokenize_str(prefix):
            state.advance(token)
        return state

    rows = [SimpleNamespace(grammar=state_at(prefix)) for prefix in prefixes]
    rows.append(SimpleNamespace(grammar=None))  # an unconstrained row is skipped
    batched(rows)
    for prefix, row in zip(prefixes, rows):
        mask = row.grammar.allowed_mask()  # after a prefetch: waits for it
        assert mask.shape == (32000,) and mask.dtype == np.bool_
        assert np.array_equal(mask, state_at(prefix).allowed_mask()), prefix
        assert 0 < mask.sum() < 32000
    # Each row's next mask is computed afresh once it has advanced.
    rows[1].grammar.advance(raw_tokens.tokenize_str("d")[0])
    batched(rows)
    assert np.array_equal(rows[1].grammar.allowed_mask(), state_at('{"name":"Ad').allowed_mask())


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"type": "strin"}, "Invalid type: strin"),
        ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}}, "unclosed group"),
        ({"type": "object", "properties": {"a": {"not": {}}}}, 'Unimplemented keys: ["not"]'),
        (
            {
                "type": "object",
                "properties": {"a": {"minimum": 5, "maximum": 1, "type": "integer"}},
                "required": ["a"],
            },
            "unsatisfiable",
        ),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/b"}}}, "does not exist"),
        # Numbers llguidance would make the model write as others: refused before it sees them.
        ({"type": "integer", "const": 2**64}, "/const: 18446744073709551616 is past +/-(2^53 - 1)"),
        (
            {"properties": {"a": {"enum": [1, {"b": [-(2**53)]}]}}},
            "/properties/a/enum: -9007199254740992 is past",
        ),
        (
            {"anyOf": [{"type": "integer", "minimum": 1e19, "maximum": 1e19}]},
            "/anyOf/0/minimum: 1e+19 is past",
        ),
        (
            {"items": {"type": "integer", "exclusiveMaximum": -(2**64)}},
            "/items/exclusiveMaximum: -1844674407",
        ),
        ({"const": 10**100}, "/const: a number of 101 digits is past"),
    ],
)
def test_schemas_json_mode_cannot_follow_are_refused_naming_the_field(
    grammars: GrammarCompiler, schema: dict[str, Any], expected: str
) -> None:
    with pytest.raises(GrammarError) as caught:
        grammars.json_schema(schema, "response_format.json_schema")
    assert caught.value.field == "response_format.json_schema"
    assert expected in caught.value.description
    # A short excerpt: llguidance's message without the grammar it quotes.
    assert "start:" not in caught.value.description and len(caught.value.description) <= 200


def test_a_limit_reached_part_way_is_the_schemas_and_a_refused_token_is_not(
    grammars: GrammarCompiler, raw_tokens: llguidance.LLTokenizer
) -> None:
    # Compiles: llguidance builds this pattern's lexer only once the string has started.
    state = grammars.json_schema(
        {"type": "string", "pattern": "^a{100000}$"}, "response_format.json_schema"
    ).start()
    assert state.field == "response_format.json_schema"
    for token in raw_tokens.tokenize_str('"a'):
        state.allowed_mask()  # where the lexer is built
        if state.error is None:
            state.advance(token)
    assert state.error is not None and "lexer error" in state.error
    assert state.gave_up
    refused = grammars.json_schema(PERSON, "response_format.json_schema").start()
    refused.advance(raw_tokens.tokenize_str("x")[0])  # never chosen: the mask does not allow it
    assert refused.error is not None and not refused.gave_up


# -- generations driven by random logits --------------------------------------------------------

SAMPLINGS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.0, seed=7),
    SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=3),
    SamplingParams(
        temperature=1.5, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.5, seed=11
    ),
]


def _run(
    generation: Generation, rng: np.random.Generator, bias: dict[int, float] | None = None
) -> list[TokenEvent]:
    """Step with random logits [vocab] (plus `bias` on the first step) until the generation ends."""
    events = []
    while not generation.finished:
        logits: npt.NDArray[np.float32] = rng.normal(0.0, 3.0, 32000).astype(np.float32)
        for token, value in (bias or {}).items() if not events else ():
            logits[token] += value
        fill_token_masks([generation])
        events.append(generation.step(logits))
    return events


def _request(
    constraint: OutputConstraint, sampling: SamplingParams, max_new_tokens: int = 400
) -> GenerationRequest:
    return GenerationRequest("r", (1, 733), max_new_tokens, sampling, constraint=constraint)


@pytest.mark.parametrize("schema", [SCHEMAS["person"], SCHEMAS["order"]], ids=["person", "order"])
@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "t1", "topk-topp", "penalties"])
def test_json_mode_output_validates_whatever_the_sampling(
    grammars: GrammarCompiler, tok: Tokenizer, schema: dict[str, Any], sampling: SamplingParams
) -> None:
    rng = np.random.default_rng(sampling.seed or 0)
    for _ in range(3):
        constraint = OutputConstraint(grammars.json_schema(schema, "f"))
        events = _run(Generation(_request(constraint, sampling), tok, 32000), rng)
        text = "".join(event.text for event in events)
        jsonschema.validate(json.loads(text), schema)
        assert events[-1].finish_reason is FinishReason.STOP and events[-1].token_id != tok.eos_id
        assert all(event.finish_reason is None for event in events[:-1])


def test_json_cut_by_max_tokens_is_a_prefix_and_says_length(
    grammars: GrammarCompiler, tok: Tokenizer
) -> None:
    constraint = OutputConstraint(grammars.json_schema(PERSON, "f"))
    events = _run(
        Generation(_request(constraint, SamplingParams(seed=1), max_new_tokens=4), tok, 32000),
        np.random.default_rng(1),
    )
    assert len(events) == 4 and events[-1].finish_reason is FinishReason.LENGTH
    text = "".join(event.text for event in events).lstrip()  # JSON may follow one space
    assert '{"name":"'.startswith(text) or text.startswith('{"name":"'), text


def _tool_generation(
    grammars: GrammarCompiler, tok: Tokenizer, choice: ToolChoice, seed: int, max_new_tokens: int = 400
) -> Generation:
    grammar = grammars.tool_calls(TOOLS, choice, "chat.tools")
    constraint = OutputConstraint(grammar, tool_calls=True, text_allowed=choice.text_allowed)
    return Generation(
        _request(constraint, SamplingParams(temperature=1.0, seed=seed + 1), max_new_tokens), tok, 32000
    )


def _valid_calls(events: list[TokenEvent]) -> None:
    calls = events[-1].tool_calls
    assert calls, "no calls"
    by_name = {tool.name: tool for tool in TOOLS}
    for call in calls:
        parameters = by_name[call.name].parameters
        assert parameters is not None
        jsonschema.validate(call.arguments, {**parameters, "additionalProperties": False})


@pytest.mark.parametrize("seed", range(5))
def test_required_calls_are_valid_and_never_text(
    grammars: GrammarCompiler, tok: Tokenizer, seed: int
) -> None:
    events = _run(_tool_generation(grammars, tok, REQUIRED, seed), np.random.default_rng(seed))
    assert events[-1].finish_reason is FinishReason.STOP
    assert "".join(event.text for event in events) == ""  # call JSON never reaches the response
    _valid_calls(events)


@pytest.mark.parametrize("seed", range(5))
def test_auto_answers_text_or_calls(grammars: GrammarCompiler, tok: Tokenizer, seed: int) -> None:
    bracket = tok.encode("[")[0]  # "▁[": a call's first token, as this tokenizer starts an answer
    calls = _run(_tool_generation(grammars, tok, AUTO, seed), np.random.default_rng(seed), {bracket: 100.0})
    assert "".join(event.text for event in calls) == ""
    _valid_calls(calls)
    text = _run(_tool_generation(grammars, tok, AUTO, seed, max_new_tokens=60), np.random.default_rng(seed))
    response = "".join(event.text for event in text)
    assert response.strip() and not response.lstrip().startswith("[") and CALL_OPENING not in response
    assert text[-1].tool_calls == ()
    # Held-back text comes out in order: the deltas are the decode of the generated ids.
    assert response == tok.decode([event.token_id for event in text if event.token_id != tok.eos_id])


@pytest.mark.parametrize("stop", ["\n", "\n\n"])
def test_whitespace_held_for_the_call_decision_meets_the_stop_strings_at_eos(
    grammars: GrammarCompiler, tok: Tokenizer, stop: str
) -> None:
    """With tools on offer (auto), leading whitespace waits to see whether calls follow; when EOS ends
    the answer there, that text is released, and a stop string in it is not emitted."""
    grammar = grammars.tool_calls(TOOLS, AUTO, "chat.tools")
    constraint = OutputConstraint(grammar, tool_calls=True, text_allowed=True)
    request = GenerationRequest(
        "r", (1, 733), 10, SamplingParams(temperature=0.0), constraint=constraint, stop=(stop,)
    )
    generation = Generation(request, tok, 32000)
    newline = tok.encode("\n")[-1]
    assert tok.decode([newline]) == "\n"
    events = []
    for token in [newline] * stop.count("\n") + [tok.eos_id]:
        logits = np.zeros(32000, dtype=np.float32)
        logits[token] = 10.0
        events.append(generation.step(logits))
        if events[-1].finish_reason is not None:
            break
    assert "".join(event.text for event in events) == ""
    assert events[-1].finish_reason is FinishReason.STOP


def test_calls_cut_by_max_tokens_report_no_call(grammars: GrammarCompiler, tok: Tokenizer) -> None:
    events = _run(_tool_generation(grammars, tok, REQUIRED, 1, max_new_tokens=6), np.random.default_rng(1))
    assert events[-1].finish_reason is FinishReason.LENGTH
    assert events[-1].tool_calls == () and "".join(event.text for event in events) == ""


@pytest.mark.parametrize("seed", range(3))
def test_parameters_with_references_resolve_within_the_tool(
    grammars: GrammarCompiler, tok: Tokenizer, seed: int
) -> None:
    """The grammar places each tool's parameters inside an array of calls; their references still
    point into the parameters (before, "#/$defs/Place" was looked up in the array and refused)."""
    grammars.tool_calls([ADD, ROUTE, WEATHER], REQUIRED, "chat.tools")  # beside other tools
    grammar = grammars.tool_calls([ADD, ROUTE], ToolChoice(ToolChoiceMode.FUNCTION, "route"), "chat.tools")
    constraint = OutputConstraint(grammar, tool_calls=True, text_allowed=False)
    sampling = SamplingParams(temperature=1.0, seed=seed + 1)
    events = _run(Generation(_request(constraint, sampling), tok, 32000), np.random.default_rng(seed))
    calls = events[-1].tool_calls
    assert calls and all(call.name == "route" for call in calls)
    assert ROUTE.parameters is not None
    for call in calls:
        jsonschema.validate(call.arguments, ROUTE.parameters)  # resolves "#" against the parameters
        assert set(call.arguments) == {"origin", "destination"}  # nothing invented at the top either


def test_a_reference_that_resolves_nowhere_is_named_as_the_tool_wrote_it(grammars: GrammarCompiler) -> None:
    broken = ToolSpec("broken", parameters={"type": "object", "properties": {"p": {"$ref": "#/$defs/Nope"}}})
    with pytest.raises(GrammarError) as caught:
        grammars.tool_calls([ADD, broken], REQUIRED, "chat.tools")
    assert "'/$defs/Nope'" in caught.value.description, caught.value.description
    assert "arguments_" not in caught.value.description  # where the grammar placed the parameters


def test_rebasing_moves_references_and_leaves_data_alone() -> None:
    schema = {
        "$ref": "#/$defs/A",
        "$defs": {"A": {"items": {"$ref": "#"}}},
        "properties": {"default": {"$ref": "#/$defs/A"}, "$ref": {"type": "string"}},
        "anyOf": [{"$ref": "#/properties/default"}, {"$ref": "https://example.com/s.json"}],
        "const": {"$ref": "#"},
        "default": {"$ref": "#/$defs/A"},
    }
    assert _rebase_refs(schema, "#/$defs/arguments_0") == {
        "$ref": "#/$defs/arguments_0/$defs/A",
        "$defs": {"A": {"items": {"$ref": "#/$defs/arguments_0"}}},
        "properties": {"default": {"$ref": "#/$defs/arguments_0/$defs/A"}, "$ref": {"type": "string"}},
        "anyOf": [{"$ref": "#/$defs/arguments_0/properties/default"}, {"$ref": "https://example.com/s.json"}],
        "const": {"$ref": "#"},  # data, not a reference
        "default": {"$ref": "#/$defs/A"},
    }


def test_calls_too_deep_for_a_response_end_the_request_with_an_error(
    grammars: GrammarCompiler, tok: Tokenizer
) -> None:
    """A recursive schema lets arguments nest without bound; nested past what a response can carry,
    the last event says so (the servicer ends the call INTERNAL) instead of carrying the calls."""
    nest = ToolSpec("nest", parameters={"type": "object", "properties": {"k": {"$ref": "#"}}})
    grammar = grammars.tool_calls([nest], REQUIRED, "chat.tools")
    for depth in (MAX_ARGUMENTS_DEPTH, MAX_ARGUMENTS_DEPTH + 1):
        arguments = '{"k":' * (depth - 1) + "{}" + "}" * (depth - 1)
        target = tok.encode(f'[{{"name":"nest","arguments":{arguments}}}]')
        generation = Generation(
            _request(
                OutputConstraint(grammar, tool_calls=True, text_allowed=False),
                SamplingParams(temperature=0.0),
            ),
            tok,
            32000,
        )
        events = []
        while not generation.finished:  # steer the greedy choice along the target's tokens
            logits = np.zeros(32000, dtype=np.float32)
            logits[target[len(events)] if len(events) < len(target) else tok.eos_id] = 100.0
            fill_token_masks([generation])
            events.append(generation.step(logits))
        assert [event.token_id for event in events[: len(target)]] == target
        last = events[-1]
        if depth == MAX_ARGUMENTS_DEPTH:
            assert last.error is None and len(last.tool_calls) == 1
        else:
            assert (
                last.tool_calls == () and last.error is not None and f"nest {depth} levels deep" in last.error
            )


# -- greedy rows without masks -----------------------------------------------------------------


def _walk_grammars(grammars: GrammarCompiler) -> list[Grammar]:
    return [
        *(grammars.json_schema(schema, "f") for schema in SCHEMAS.values()),
        grammars.tool_calls(TOOLS, AUTO, "chat.tools"),
        grammars.tool_calls(TOOLS, REQUIRED, "chat.tools"),
    ]


def test_allows_answers_as_the_mask_does(
    grammars: GrammarCompiler, raw_tokens: llguidance.LLTokenizer
) -> None:
    """Along random paths through every grammar, `allows` (which skips the mask where it can) agrees
    with the mask on random tokens, allowed ones, EOS, and the first byte of forced text spelled as a
    token of its own: the matcher consumes that spelling, the mask (canonical tokens only) does not."""
    rng = np.random.default_rng(0)
    checked_forced = 0
    for grammar in _walk_grammars(grammars):
        for _ in range(3):
            path: list[int] = []
            walker = grammar.start()
            while not walker.finished and len(path) < 80:
                forced = walker._matcher.compute_ff_bytes()
                mask = walker.allowed_mask()
                allowed = np.flatnonzero(mask)
                candidates = [*rng.integers(0, 32000, 40), *rng.choice(allowed, min(10, allowed.size)), 2]
                if forced:
                    candidates += [3 + forced[0], *raw_tokens.tokenize_bytes(forced[:1])]
                    checked_forced += 1
                probe = grammar.start(greedy=True)
                for token in path:
                    probe.advance(token)
                for token in candidates:
                    assert probe.allows(int(token)) == mask[token], (path, token, forced)
                token = int(rng.choice(allowed))
                path.append(token)
                walker.advance(token)
    assert checked_forced > 50  # the case the mask and the matcher disagree on was exercised


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, repetition_penalty=1.3, presence_penalty=1.0),
    ],
    ids=["greedy", "greedy-penalties"],
)
def test_greedy_rows_pick_what_the_mask_would(
    grammars: GrammarCompiler, tok: Tokenizer, sampling: SamplingParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A greedy generation, which skips the mask where the grammar allows its best token, picks step
    by step the argmax over the mask (the reference computes every mask); and it skips masks."""
    masks_computed = 0
    allowed_mask = GrammarState.allowed_mask

    def counted(state: GrammarState) -> npt.NDArray[np.bool_]:
        nonlocal masks_computed
        masks_computed += state._bitmask is None
        mask: npt.NDArray[np.bool_] = allowed_mask(state)
        return mask

    steps = 0
    for seed, grammar in enumerate(_walk_grammars(grammars)):
        rng = np.random.default_rng(seed)
        generation = Generation(_request(OutputConstraint(grammar), sampling, max_new_tokens=120), tok, 32000)
        reference, chooser = grammar.start(), TokenChooser(sampling, (1, 733), 32000)
        while not generation.finished:
            logits: npt.NDArray[np.float32] = rng.normal(0.0, 3.0, 32000).astype(np.float32)
            expected = chooser.choose(logits, reference.allowed_mask())
            reference.advance(expected)
            with monkeypatch.context() as patched:
                patched.setattr(GrammarState, "allowed_mask", counted)
                fill_token_masks([generation])
                assert generation.step(logits).token_id == expected, steps
            steps += 1
    assert masks_computed < steps, (masks_computed, steps)
