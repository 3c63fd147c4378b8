"""Tools and JSON mode from the wire to a typed request, without a model: the documented prompt format
(golden), the two tool forms, the runWithTools round trip, the call splitter, and every refusal
naming its field."""

# ruff: noqa: F811  (pytest fixtures are imported from tokenizer_fixtures and then requested by name)

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st
from textgen.v1 import textgen_pb2 as pb
from textgen_server import prompt as prompt_module
from textgen_server import tools as tools_module
from textgen_server import validation
from textgen_server.grammar import GrammarCompiler
from textgen_server.model_config import ModelConfig
from textgen_server.tokenizer import Tokenizer
from textgen_server.tools import (
    MAX_ARGUMENTS_DEPTH,
    MAX_JSON_DEPTH,
    CallSplitter,
    ToolCall,
    dumps,
    json_depth,
    parse_call_message,
)
from textgen_server.validation import InvalidRequestError, build_request
from tokenizer_fixtures import grammars, spm_model_path, tok, tokenizer_json  # noqa: F401  (fixtures)

CONFIG = ModelConfig("test", "fp32", num_layers=2, num_kv_heads=2, head_dim=16, vocab_size=32000)
PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city"],
}
NESTED = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Current weather", "parameters": PARAMETERS},
}
FLAT = {"name": "get_weather", "description": "Current weather", "parameters": PARAMETERS}
QUESTION = {"role": "user", "content": "What is the weather in Paris?"}

# The documented format (README, "Tools"): the tools offered close the last user turn.
TOOLS_BLOCK = (
    "You can call these functions:\n"
    '[{"name":"get_weather","description":"Current weather","parameters":'
    '{"properties":{"city":{"type":"string"},"unit":{"enum":["c","f"]}},"required":["city"],"type":"object"}}]\n'
    "To call one or more of them, reply with nothing but a JSON array of calls: "
    '[{"name":"<function name>","arguments":{<its arguments>}}]. Otherwise, answer in plain text.'
)


def typed(tok: Tokenizer, grammars: GrammarCompiler, body: dict[str, Any]) -> Any:
    message = json_format.ParseDict({"max_tokens": 16, **body}, pb.GenerateRequest())
    return build_request(
        message, tokenizer=tok, config=CONFIG, adapters=frozenset(), request_id="t", grammars=grammars
    )


def violations(tok: Tokenizer, grammars: GrammarCompiler, body: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(InvalidRequestError) as caught:
        typed(tok, grammars, body)
    return [(v.field, v.description) for v in caught.value.violations]


def test_input_that_cannot_fit_is_refused_before_it_is_tokenized(
    tok: Tokenizer, grammars: GrammarCompiler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4000 tools (890 KiB) were tokenized whole, 600 ms of the event loop, before being refused."""
    tools = [{**FLAT, "name": f"tool_{i}", "description": "d" * 200} for i in range(400)]
    body = {"chat": {"messages": [QUESTION], "tools": tools}}
    limit = CONFIG.max_input_length * tok.longest_piece

    def untokenized(*args: object, **kwargs: object) -> list[int]:
        raise AssertionError("tokenized")

    with monkeypatch.context() as patch:
        patch.setattr(tok, "encode", untokenized)
        [(field, description)] = violations(tok, grammars, body)
    assert field == "input"
    chars = int(description.split()[0])
    assert chars > limit and description.endswith(
        f"exceed what max_input_length={CONFIG.max_input_length} tokens can hold "
        f"(a token is at most {tok.longest_piece} characters)"
    )
    # Below the bound the text is tokenized and counted as before.
    few = {"chat": {"messages": [QUESTION], "tools": tools[:100]}}
    [(field, description)] = violations(tok, grammars, few)
    assert field == "input" and description.endswith(
        f"input tokens exceed max_input_length={CONFIG.max_input_length}"
    )
    assert tok.longest_piece == max(len(tok.decode([i])) for i in range(3, 32000))


def test_structs_too_big_for_any_allowed_json_are_refused_unconverted(
    tok: Tokenizer, grammars: GrammarCompiler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Converting a megabyte of Struct held the event loop for 100 ms before its size was checked."""
    schema = {"type": "array", "items": {"enum": list(range(95_000))}}  # 1 MiB on the wire
    big = {"type": "object", "properties": {"p": {"enum": list(range(30_000))}}}  # 330 KB on the wire
    tools = [{**FLAT, "name": f"tool_{i}", "parameters": big} for i in range(2)]

    def unconverted(*args: object) -> None:
        raise AssertionError("converted")

    with monkeypatch.context() as patch:
        patch.setattr(validation, "_struct", unconverted)
        [(field, description)] = violations(
            tok, grammars, {"prompt": "Hi", "response_format": {"type": "json_schema", "json_schema": schema}}
        )
        assert field == "response_format.json_schema"
        assert description.startswith(f"must be at most {validation.MAX_SCHEMA_CHARS} characters")
        [(field, description)] = violations(tok, grammars, {"chat": {"messages": [QUESTION], "tools": tools}})
        limit = CONFIG.max_input_length * tok.longest_piece
        assert field == "chat.tools[0].parameters" and description.endswith(
            f"more than any within the {limit} characters of JSON the input's tokens can hold"
        )
    # Under the bound, parameters are converted and checked as ever, the one that crosses it named.
    small = {**FLAT, "parameters": {"type": "string"}}
    half = {"type": "object", "properties": {"p": {"enum": list(range(15_000))}}}  # 165 KB
    several = [small, *({**FLAT, "name": f"tool_{i}", "parameters": half} for i in range(2))]
    body = {"chat": {"messages": [QUESTION], "tools": several}}
    assert [field for field, _ in violations(tok, grammars, body)] == [
        "chat.tools[0].parameters",  # not an object
        "chat.tools[2].parameters",  # 330 KB with the one before
        "input",  # the one converted is too long for the prompt
    ]


@pytest.mark.parametrize(
    "value",
    [
        list(range(10)) * 3000,  # the worst case: a byte-wide number in a list
        [[]] * 10000,
        [None, True, False, {}, "", "😀", 0.5, -1] * 2000,
        {f"k{i}": i % 10 for i in range(5000)},
        {f"😀{i}": {"😀": [1, "é"]} for i in range(3000)},
    ],
)
def test_a_structs_bytes_bound_its_json(value: object) -> None:
    """The bound that refuses Structs unconverted never refuses one within the JSON limit."""
    struct = struct_pb2.Struct()
    struct.update({"v": value})
    assert struct.ByteSize() <= validation.STRUCT_BYTES_PER_JSON_CHAR * len(dumps({"v": value}))


def test_tools_prompt_golden(tok: Tokenizer, grammars: GrammarCompiler) -> None:
    request = typed(
        tok,
        grammars,
        {"chat": {"messages": [{"role": "system", "content": "Be brief."}, QUESTION], "tools": [NESTED]}},
    )
    expected = [
        tok.bos_id,
        *tok.encode(f"[INST] Be brief.\n\nWhat is the weather in Paris?\n\n{TOOLS_BLOCK} [/INST]"),
    ]
    assert list(request.prompt_ids) == expected
    assert (
        request.constraint is not None and request.constraint.tool_calls and request.constraint.text_allowed
    )


def test_flat_and_nested_tools_give_the_same_tokens(tok: Tokenizer, grammars: GrammarCompiler) -> None:
    nested = typed(tok, grammars, {"chat": {"messages": [QUESTION], "tools": [NESTED]}})
    flat = typed(tok, grammars, {"chat": {"messages": [QUESTION], "tools": [FLAT]}})
    # A Struct keeps no key order; the prompt must not depend on the order the client wrote.
    properties = {"unit": {"enum": ["c", "f"]}, "city": {"type": "string"}}
    parameters = {"required": ["city"], "properties": properties, "type": "object"}
    reordered = {"parameters": parameters, "description": "Current weather", "name": "get_weather"}
    shuffled = typed(tok, grammars, {"chat": {"messages": [QUESTION], "tools": [reordered]}})
    assert nested.prompt_ids == flat.prompt_ids == shuffled.prompt_ids
    assert tok.decode(list(nested.prompt_ids)).endswith(f"{TOOLS_BLOCK} [/INST]")


@pytest.mark.parametrize(
    ("choice", "how"),
    [
        (
            "required",
            (
                "Reply with nothing but a JSON array of one or more calls: "
                '[{"name":"<function name>","arguments":{<its arguments>}}].'
            ),
        ),
        (
            "get_weather",
            (
                "Reply with nothing but a JSON array of calls of get_weather: "
                '[{"name":"get_weather","arguments":{<its arguments>}}].'
            ),
        ),
    ],
)
def test_tool_choice_changes_the_instruction(
    tok: Tokenizer, grammars: GrammarCompiler, choice: str, how: str
) -> None:
    request = typed(
        tok, grammars, {"chat": {"messages": [QUESTION], "tools": [NESTED], "tool_choice": choice}}
    )
    assert tok.decode(list(request.prompt_ids)).endswith(f"{how} [/INST]")
    assert request.constraint is not None and not request.constraint.text_allowed


def test_tool_choice_none_offers_nothing(tok: Tokenizer, grammars: GrammarCompiler) -> None:
    none = typed(tok, grammars, {"chat": {"messages": [QUESTION], "tools": [NESTED], "tool_choice": "none"}})
    plain = typed(tok, grammars, {"chat": {"messages": [QUESTION]}})
    assert none.prompt_ids == plain.prompt_ids and none.constraint is None


def test_round_trip_renders_as_documented(tok: Tokenizer, grammars: GrammarCompiler) -> None:
    """Workers AI's runWithTools: the call as an assistant message, the result as a `tool` message."""
    messages = [
        QUESTION,
        {"role": "assistant", "content": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"role": "tool", "name": "get_weather", "content": '{"temp_c": 21}'},
    ]
    request = typed(tok, grammars, {"chat": {"messages": messages}})
    expected = [
        tok.bos_id,
        *tok.encode("[INST] What is the weather in Paris? [/INST]"),
        *tok.encode('[{"name":"get_weather","arguments":{"city":"Paris"}}]'),
        tok.eos_id,
        *tok.encode('[INST] Function results:\n[{"name":"get_weather","result":{"temp_c":21}}] [/INST]'),
    ]
    assert list(request.prompt_ids) == expected
    assert request.constraint is None  # the final answer: no tools offered


def test_several_calls_their_results_and_a_user_message(tok: Tokenizer, grammars: GrammarCompiler) -> None:
    messages = [
        QUESTION,
        {"role": "assistant", "content": '{"name":"get_weather","arguments":{"city":"Paris"}}'},
        {"role": "assistant", "content": '{"name":"get_weather","arguments":{"city":"Oslo"}}'},
        {"role": "tool", "content": "sunny"},  # the name comes from its call
        {"role": "tool", "name": "get_weather", "content": "[1, 2]"},
        {"role": "user", "content": "And in Rome?"},
    ]
    request = typed(tok, grammars, {"chat": {"messages": messages, "tools": [FLAT]}})
    expected = [
        tok.bos_id,
        *tok.encode("[INST] What is the weather in Paris? [/INST]"),
        *tok.encode(
            '[{"name":"get_weather","arguments":{"city":"Paris"}},'
            '{"name":"get_weather","arguments":{"city":"Oslo"}}]'
        ),
        tok.eos_id,
        *tok.encode(
            "[INST] Function results:\n"
            '[{"name":"get_weather","result":"sunny"},{"name":"get_weather","result":[1,2]}]\n\n'
            f"And in Rome?\n\n{TOOLS_BLOCK} [/INST]"
        ),
    ]
    assert list(request.prompt_ids) == expected


def test_merged_calls_and_results_are_rendered_once_a_turn(
    tok: Tokenizer, grammars: GrammarCompiler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each call message and each result rendered its whole turn again: 2000 of each took 18 s of a
    validation worker, holding the GIL."""
    rendered: list[str] = []
    for name in ("render_calls", "render_results"):
        real = getattr(prompt_module, name)

        def counted(items: Any, real: Any = real, name: str = name) -> str:
            rendered.append(name)
            return str(real(items))

        monkeypatch.setattr(prompt_module, name, counted)
    call = '{"name":"get_weather","arguments":{"city":"Paris"}}'
    messages = [
        QUESTION,
        *[{"role": "assistant", "content": call}] * 50,
        *[{"role": "tool", "content": "sunny"}] * 50,
    ]
    request = typed(tok, grammars, {"chat": {"messages": messages}})
    assert rendered == ["render_calls", "render_results"]
    results = ",".join(['{"name":"get_weather","result":"sunny"}'] * 50)
    assert list(request.prompt_ids) == [
        tok.bos_id,
        *tok.encode("[INST] What is the weather in Paris? [/INST]"),
        *tok.encode(f"[{','.join([call] * 50)}]"),
        tok.eos_id,
        *tok.encode(f"[INST] Function results:\n[{results}] [/INST]"),
    ]


def test_text_no_prompt_can_hold_is_refused_before_the_conversation_is_read(
    tok: Tokenizer, grammars: GrammarCompiler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The conversation's checks parse every call and result: a chat too long for any prompt is
    refused on its characters first, whatever its shape (tool messages' names count)."""

    def unread(*args: object, **kwargs: object) -> list[int]:
        raise AssertionError("the conversation was read")

    monkeypatch.setattr(validation, "encode_chat", unread)
    call = {"role": "assistant", "content": '{"name":"f","arguments":{}}'}
    results = [{"role": "tool", "name": "f" * 64, "content": "1"}] * 1000
    body = {"chat": {"messages": [QUESTION, *[call] * 1000, *results]}}
    chars = len(QUESTION["content"]) + 1000 * (len(call["content"]) + 65)
    assert chars > CONFIG.max_input_length * tok.longest_piece > chars - 1000 * 64
    [(field, description)] = violations(tok, grammars, body)
    assert field == "input" and description.startswith(f"{chars} characters of messages and tools exceed")


@pytest.mark.parametrize("name", ["", "get_weather"])
def test_a_tool_message_may_name_its_function(tok: Tokenizer, grammars: GrammarCompiler, name: str) -> None:
    call = {"role": "assistant", "content": '{"name":"get_weather","arguments":{}}'}
    request = typed(tok, grammars, {"chat": {"messages": [QUESTION, call, {"role": "tool", "name": name}]}})
    assert tok.decode(list(request.prompt_ids)).endswith('[{"name":"get_weather","result":""}] [/INST]')


@pytest.mark.parametrize("name", ["get weather", "x" * 65, "ab " * 330_000])
def test_a_tool_message_naming_no_possible_function_is_refused(
    tok: Tokenizer, grammars: GrammarCompiler, name: str
) -> None:
    call = {"role": "assistant", "content": '{"name":"get_weather","arguments":{}}'}
    body = {"chat": {"messages": [QUESTION, call, {"role": "tool", "name": name, "content": "1"}]}}
    [(field, description)] = violations(tok, grammars, body)
    assert field == "chat.messages[2].name" and description.startswith(
        "a function's name: 1 to 64 letters, digits, '_' or '-', got "
    )
    assert len(description) < 200


@pytest.mark.parametrize(
    ("messages", "field", "description"),
    [
        (
            [QUESTION, {"role": "tool", "content": "x"}],
            "chat.messages[1].role",
            "a 'tool' message must follow an 'assistant' message holding a tool call",
        ),
        (
            [QUESTION, {"role": "assistant", "content": "Sunny."}, {"role": "tool", "content": "x"}],
            "chat.messages[2].role",
            "a 'tool' message must follow an 'assistant' message holding a tool call",
        ),
        (
            [
                QUESTION,
                {"role": "assistant", "content": '[{"name":"f","arguments":{}}]'},
                {"role": "tool", "content": "1"},
                {"role": "tool", "content": "2"},
            ],
            "chat.messages[3].role",
            "more 'tool' results than the 1 call(s) in messages[1]",
        ),
        (
            [QUESTION, {"role": "assistant", "content": '[{"name":"f","arguments":{}}]'}],
            "chat.messages[1].role",
            "the conversation must end with a 'user' or 'tool' message, got 'assistant'",
        ),
    ],
)
def test_bad_tool_conversations(
    tok: Tokenizer, grammars: GrammarCompiler, messages: list[dict[str, str]], field: str, description: str
) -> None:
    assert violations(tok, grammars, {"chat": {"messages": messages}}) == [(field, description)]


BAD_SCHEMA = {"type": "object", "properties": {"city": {"type": "strin"}}}


@pytest.mark.parametrize(
    ("body", "field", "excerpt"),
    [
        (
            {"chat": {"messages": [QUESTION], "tools": [NESTED], "tool_choice": "get_wether"}},
            "chat.tool_choice",
            "got 'get_wether'",
        ),
        (
            {"chat": {"messages": [QUESTION], "tool_choice": "required"}},
            "chat.tool_choice",
            "needs chat.tools",
        ),
        (
            {"chat": {"messages": [QUESTION], "tools": [{**FLAT, "parameters": BAD_SCHEMA}]}},
            "chat.tools[0].parameters",
            "Invalid type: strin",
        ),
        (
            {
                "chat": {
                    "messages": [QUESTION],
                    "tools": [
                        NESTED,
                        {"type": "function", "function": {"name": "f", "parameters": BAD_SCHEMA}},
                    ],
                }
            },
            "chat.tools[1].function.parameters",
            "Invalid type: strin",
        ),
        (
            {"chat": {"messages": [QUESTION], "tools": [{"name": "f", "parameters": {"type": "string"}}]}},
            "chat.tools[0].parameters",
            "type 'object'",
        ),
        ({"chat": {"messages": [QUESTION], "tools": [{**NESTED, **FLAT}]}}, "chat.tools[0]", "not both"),
        (
            {"chat": {"messages": [QUESTION], "tools": [{"name": "get weather"}]}},
            "chat.tools[0].name",
            "got 'get weather'",
        ),
        (
            {"chat": {"messages": [QUESTION], "tools": [FLAT, NESTED]}},
            "chat.tools[1].function.name",
            "names two tools",
        ),
        (
            {"chat": {"messages": [QUESTION], "tools": [{**NESTED, "type": "retrieval"}]}},
            "chat.tools[0].type",
            "got 'retrieval'",
        ),
        (
            {"prompt": "Hi", "response_format": {"type": "json_schema", "json_schema": BAD_SCHEMA}},
            "response_format.json_schema",
            "Invalid type: strin",
        ),
        (
            {"prompt": "Hi", "response_format": {"type": "json_schema"}},
            "response_format.json_schema",
            "required",
        ),
        (
            {"prompt": "Hi", "response_format": {"type": "json_object", "json_schema": PARAMETERS}},
            "response_format.json_schema",
            "'json_schema' only",
        ),
        ({"prompt": "Hi", "response_format": {"type": "text"}}, "response_format.type", "got 'text'"),
        (
            {"prompt": "Hi", "response_format": {"type": "json_object"}, "stop": ["}"]},
            "stop",
            "cut the JSON short",
        ),
        (
            {"chat": {"messages": [QUESTION], "tools": [FLAT]}, "response_format": {"type": "json_object"}},
            "response_format",
            "either JSON or tool calls",
        ),
        (
            {
                "prompt": "Hi",
                "response_format": {"type": "json_schema", "json_schema": {"enum": ["x" * 40000]}},
            },
            "response_format.json_schema",
            "at most 32768 characters",
        ),
    ],
)
def test_refusals_name_the_field(
    tok: Tokenizer, grammars: GrammarCompiler, body: dict[str, Any], field: str, excerpt: str
) -> None:
    ((got_field, description),) = violations(tok, grammars, body)
    assert got_field == field and excerpt in description and len(description) <= 240


def test_response_format_for_prompt_and_chat(tok: Tokenizer, grammars: GrammarCompiler) -> None:
    for body in (
        {"prompt": "Hi"},
        {"chat": {"messages": [QUESTION]}},
        {"chat": {"messages": [QUESTION], "tools": [FLAT], "tool_choice": "none"}},
    ):
        request = typed(
            tok, grammars, {**body, "response_format": {"type": "json_schema", "json_schema": PARAMETERS}}
        )
        assert request.constraint is not None and not request.constraint.tool_calls


def test_openai_wrapper_is_unwrapped(tok: Tokenizer, grammars: GrammarCompiler) -> None:
    wrapper = {"name": "w", "strict": True, "schema": BAD_SCHEMA}  # OpenAI's form of json_schema
    body = {"prompt": "Hi", "response_format": {"type": "json_schema", "json_schema": wrapper}}
    assert violations(tok, grammars, body) == [("response_format.json_schema", "Invalid type: strin")]


def test_without_a_grammar_compiler_tools_are_unimplemented(tok: Tokenizer) -> None:
    from textgen_server.validation import UnsupportedFeatureError

    message = json_format.ParseDict({"chat": {"messages": [QUESTION], "tools": [FLAT]}}, pb.GenerateRequest())
    with pytest.raises(UnsupportedFeatureError, match="chat.tools"):
        build_request(message, tokenizer=tok, config=CONFIG, adapters=frozenset(), request_id="t")


# -- the call splitter and call messages ----------------------------------------------------------


def test_splitter_holds_blank_text_until_the_answer_shows_its_kind() -> None:
    text = CallSplitter(calls_only=False)
    assert [text.push(d) for d in (" ", "\n", "Hi", " there")] == ["", "", " \nHi", " there"]
    assert text.push("", final=True) == "" and text.calls == ()
    calls = CallSplitter(calls_only=False)
    deltas = [" ", '[{"name":"f",', '"arguments":{"a":1}}', "]"]
    assert [calls.push(d, final=i == 3) for i, d in enumerate(deltas)] == ["", "", "", ""]
    assert calls.calls == (ToolCall("f", {"a": 1}),)
    blank = CallSplitter(calls_only=False)
    assert blank.push(" ") == "" and blank.push("\n", final=True) == " \n"
    cut = CallSplitter(calls_only=True)
    assert cut.push('[{"name":"f","argu', final=True) == "" and cut.calls == ()


@pytest.mark.parametrize(
    ("content", "calls"),
    [
        ('{"name":"f","arguments":{"a":1}}', [ToolCall("f", {"a": 1})]),
        (
            ' [{"name": "f", "arguments": {}}, {"name": "g", "arguments": {"b": [2]}}] ',
            [ToolCall("f", {}), ToolCall("g", {"b": [2]})],
        ),
        ('{"name":"f","arguments":{},"id":"1"}', None),  # not exactly a call
        ('{"a": 1}', None),
        ("[]", None),
        ('{"name": "f"', None),
        ("Sunny, 21 °C.", None),
    ],
)
def test_call_messages(content: str, calls: list[ToolCall] | None) -> None:
    assert parse_call_message(content) == calls


# -- JSON nested past what the parser and a response can take --------------------------------------


def _nested(depth: int) -> str:
    """JSON arrays and objects alternating, `depth` levels deep, an int at the bottom."""
    text = "1"
    for level in range(depth):
        text = f"[{text}]" if level % 2 else f'{{"k":{text}}}'
    return text


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ("1", 0),
        ('"[{["', 0),  # brackets inside a string
        (r'["\"]", {"a": "}\\"}]', 2),  # escaped quotes and backslashes end no string early
        ('[{"a": [1]}, {"b": {}}]', 3),
        (_nested(40), 40),
        ("[" * 12000, 12000),  # what the fuzzer sent: never closed
    ],
)
def test_json_depth_matches_the_parser(text: str, depth: int) -> None:
    assert json_depth(text) == depth
    if depth <= 40:  # json parses these: the nesting of what it returns agrees
        assert _parsed_depth(json.loads(text)) == depth


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ('["' + "[" * 100, 1),  # an unterminated string holds the rest, as the parser reads it
        ('[{"a": "' + '\\"' * 3000, 2),  # an escaped quote after another never closes it
        ('[["a\\', 2),  # nor does a backslash at the very end
    ],
)
def test_json_depth_of_an_unterminated_string(text: str, depth: int) -> None:
    assert json_depth(text) == depth


@given(st.text(alphabet='"\\[x', max_size=40))
def test_every_quote_outside_a_string_starts_a_string_match(text: str) -> None:
    """What keeps json_depth's scan linear: each match attempt at a quote succeeds, so the scan never
    retries from a quote inside it. The pattern that needed a closing quote failed at every quote of
    an unterminated string after scanning to its end: 6 KB took 0.1 s, holding the GIL."""
    position = 0
    while (position := text.find('"', position)) != -1:
        found = tools_module._JSON_STRING.match(text, position)
        assert found is not None, (text, position)
        position = found.end()


def _parsed_depth(value: Any) -> int:
    if isinstance(value, dict):
        value = list(value.values())
    if not isinstance(value, list):
        return 0
    return 1 + max((_parsed_depth(item) for item in value), default=0)


def test_deep_json_in_a_conversation_is_text(tok: Tokenizer, grammars: GrammarCompiler) -> None:
    """A call message or tool result nested past MAX_JSON_DEPTH stays text; before, json.loads raised
    RecursionError out of the handler (a fuzzed assistant message of 12 KB of `[`)."""
    assert parse_call_message("[" * 12000) is None
    for content in ("[" * 6000, "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)):
        assert parse_call_message(content) is None
        messages = [QUESTION, {"role": "assistant", "content": content}, {"role": "user", "content": "and?"}]
        request = typed(tok, grammars, {"chat": {"messages": messages}})
        assert list(request.prompt_ids) == [
            tok.bos_id,
            *tok.encode("[INST] What is the weather in Paris? [/INST]"),
            *tok.encode(content),
            tok.eos_id,
            *tok.encode("[INST] and? [/INST]"),
        ]
    deep_result = _nested(MAX_JSON_DEPTH + 1)
    messages = [
        QUESTION,
        {"role": "assistant", "content": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"role": "tool", "name": "get_weather", "content": deep_result},
    ]
    prompt = tok.decode(list(typed(tok, grammars, {"chat": {"messages": messages}}).prompt_ids))
    assert json.dumps(deep_result) in prompt  # kept as a JSON string, not parsed


@pytest.mark.parametrize("message", [pb.GenerateResponse, pb.GenerateStreamResponse])
def test_max_arguments_depth_is_what_a_response_can_carry(message: Any) -> None:
    """protobuf (upb) decodes a response whose call arguments nest MAX_ARGUMENTS_DEPTH objects deep,
    and not one more."""

    def response(depth: int) -> bytes:
        arguments = json.loads(_nested(depth).replace("[", '{"k":').replace("]", "}"))
        encoded = message()
        encoded.tool_calls.add(name="f").arguments.update(arguments)
        return bytes(encoded.SerializeToString())

    message.FromString(response(MAX_ARGUMENTS_DEPTH))
    with pytest.raises(DecodeError):
        message.FromString(response(MAX_ARGUMENTS_DEPTH + 1))


def test_calls_too_deep_for_a_response_are_an_error_not_an_undecodable_response() -> None:
    def split(depth: int) -> CallSplitter:
        arguments = "1"
        for _ in range(depth):
            arguments = f'{{"k":{arguments}}}'
        splitter = CallSplitter(calls_only=True)
        splitter.push(f'[{{"name":"f","arguments":{arguments}}}]', final=True)
        return splitter

    fits = split(MAX_ARGUMENTS_DEPTH)
    assert fits.error is None and len(fits.calls) == 1
    too_deep = split(MAX_ARGUMENTS_DEPTH + 1)
    assert too_deep.calls == ()
    assert too_deep.error == (
        f"a tool call's arguments nest {MAX_ARGUMENTS_DEPTH + 1} levels deep; a response carries at most "
        f"{MAX_ARGUMENTS_DEPTH} (protobuf's depth limit)"
    )


@pytest.mark.parametrize("number", ["5E+071597857", "-1e309", "1" + "0" * 400, "9" * 5000])
def test_a_number_past_a_double_is_an_error_not_a_response_no_client_can_read(number: str) -> None:
    # The grammar bounds every number (test_grammar.py); should one get past it, it is still refused.
    splitter = CallSplitter(calls_only=True)
    splitter.push(f'[{{"name":"f","arguments":{{"x":{number}}}}}]', final=True)
    assert splitter.calls == ()
    assert splitter.error is not None and "beyond a double" in splitter.error
    assert len(splitter.error) < 300  # the number quoted as an excerpt
    within = CallSplitter(calls_only=True)
    within.push('[{"name":"f","arguments":{"x":1.7e308,"y":-12,"z":[0.5]}}]', final=True)
    assert within.error is None and within.calls[0].arguments == {"x": 1.7e308, "y": -12, "z": [0.5]}


# -- the README documents the format the code renders -----------------------------------------------


def _as_documented(tok: Tokenizer, ids: list[int]) -> str:
    """Prompt ids as the README writes them: <s> and </s> for BOS and EOS, decoded text between."""
    text, run = [], []
    for token in [*ids, None]:
        if token in (tok.bos_id, tok.eos_id, None):
            text.append(tok.decode(run))
            run = []
            if token is not None:
                text.append("<s>" if token == tok.bos_id else "</s>")
        else:
            run.append(token)
    return "".join(text)


def test_readme_shows_the_rendered_prompts(tok: Tokenizer, grammars: GrammarCompiler) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Tools and JSON mode\n", 1)[1].split("\n## ", 1)[0]
    offered, round_trip = [block.split("\n```", 1)[0] for block in section.split("\n```\n")[1::2]]
    request = typed(tok, grammars, {"chat": {"messages": [QUESTION], "tools": [NESTED]}})
    assert _as_documented(tok, list(request.prompt_ids)) == offered
    messages = [
        QUESTION,
        {"role": "assistant", "content": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"role": "tool", "name": "get_weather", "content": '{"temp_c": 21}'},
    ]
    request = typed(tok, grammars, {"chat": {"messages": messages}})
    assert _as_documented(tok, list(request.prompt_ids)) == round_trip
