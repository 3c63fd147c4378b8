"""The `textgen` CLI, run as main([...]) against the fake in-process server."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from _fake_server import FakeTextGeneration, serve
from textgen import _retry
from textgen.cli import main


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTextGeneration]:
    monkeypatch.setattr(_retry, "backoff", lambda retries_done, **_: 0.0)
    with serve() as server:
        yield server


def run(fake: FakeTextGeneration, *argv: str) -> int:
    return main(["--target", fake.target, *argv])


def test_generate_prints_the_text_and_the_summary_on_stderr(
    fake: FakeTextGeneration, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        run(fake, "generate", "Hello big world", "--max-tokens", "2", "--temperature", "0", "--seed", "7")
        == 0
    )
    out, err = capsys.readouterr()
    assert out == "Hello big\n"
    assert err == "[finish_reason=length prompt_tokens=3 completion_tokens=2 total_tokens=5]\n"
    request = fake.requests[-1]
    assert (request.max_tokens, request.temperature, request.seed) == (2, 0.0, 7)
    assert request.HasField("temperature") and not request.HasField("top_p")


def test_generate_passes_every_option(fake: FakeTextGeneration, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "Hi", "--raw", "--lora", "pirate", "--top-p", "0.5", "--top-k", "3"]
    argv += ["--repetition-penalty", "1.5", "--frequency-penalty", "0.5", "--presence-penalty", "0.25"]
    argv += ["--stop", "END", "--stop", "\n"]
    assert run(fake, *argv) == 0
    r = fake.requests[-1]
    assert (r.raw, r.lora, r.top_p, r.top_k, list(r.stop)) == (True, "pirate", 0.5, 3, ["END", "\n"])
    assert (r.repetition_penalty, r.frequency_penalty, r.presence_penalty) == (1.5, 0.5, 0.25)


def test_generate_stream_prints_the_text_as_it_arrives(
    fake: FakeTextGeneration, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(fake, "generate", "one two three", "--stream") == 0
    out, err = capsys.readouterr()
    assert out == "one two three\n"
    assert "finish_reason=stop" in err and "completion_tokens=3" in err


def test_json_prints_one_object(fake: FakeTextGeneration, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(fake, "generate", "Hi there", "--json") == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {
        "response": "Hi there",
        "tool_calls": [],
        "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
        "finish_reason": "stop",
        "request_id": fake.metadata[-1]["x-request-id"],
    }
    assert err == ""


def test_json_stream_prints_one_object_per_chunk(
    fake: FakeTextGeneration, capsys: pytest.CaptureFixture[str]
) -> None:
    # Connection options and --json are accepted before the command too.
    assert main(["--json", "--target", fake.target, "--timeout", "5", "generate", "a b", "--stream"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["response"] for line in lines] == ["a", " b", ""]
    assert lines[0]["token"] == {"id": 100, "text": "a", "special": False}
    assert lines[-1]["finish_reason"] == "stop" and lines[-1]["usage"]["total_tokens"] == 4


def test_chat_builds_messages_from_options(
    fake: FakeTextGeneration, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["chat", "--system", "Be brief.", "--message", "user:Hi: there", "--message", "assistant:Yes?"]
    assert run(fake, *argv, "--message", "user:Go on") == 0
    assert capsys.readouterr().out == "Go on\n"
    messages = [(m.role, m.content) for m in fake.requests[-1].chat.messages]
    assert messages == [
        ("system", "Be brief."),
        ("user", "Hi: there"),
        ("assistant", "Yes?"),
        ("user", "Go on"),
    ]


def test_chat_reads_messages_and_tools_as_json(
    fake: FakeTextGeneration, capsys: pytest.CaptureFixture[str]
) -> None:
    messages = json.dumps([{"role": "user", "content": "Weather in Oslo?"}])
    tools = json.dumps(
        [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    )
    assert run(fake, "chat", "--messages", messages, "--tools", tools) == 0
    out, _ = capsys.readouterr()
    prefix, _, arguments = out.partition(" {")
    assert prefix == "tool_call: get_weather" and out.endswith("}\n")
    assert json.loads("{" + arguments) == {"text": "Weather in Oslo?", "n": 3}
    assert fake.requests[-1].chat.tools[0].function.name == "get_weather"


def test_tools_and_json_schema_from_files(
    fake: FakeTextGeneration, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    tools = tmp_path / "tools.json"  # the flat form, as Workers AI also takes it
    tools.write_text(json.dumps([{"name": "get_weather", "parameters": {"type": "object"}}]))
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}}))
    argv = ["chat", "--message", "user:Oslo?", "--tools", str(tools), "--tool-choice", "required"]
    assert run(fake, *argv, "--stream") == 0
    out, _ = capsys.readouterr()
    *text, call = out.splitlines()  # the calls come after the streamed text
    assert call.startswith("tool_call: get_weather {") and text == ["Oslo?"]
    assert json.loads(call.removeprefix("tool_call: get_weather ")) == {"text": "Oslo?", "n": 3}
    request = fake.requests[-1]
    assert (request.chat.tools[0].type, request.chat.tools[0].function.name) == ("function", "get_weather")
    assert request.chat.tool_choice == "required"
    assert run(fake, "generate", "Hi", "--json-schema", str(schema)) == 0
    sent = fake.requests[-1].response_format
    assert sent.type == "json_schema" and set(sent.json_schema.fields) == {"type", "properties"}
    assert run(fake, "generate", "Hi", "--json-object") == 0
    assert fake.requests[-1].response_format.type == "json_object"


def test_a_wrong_tool_shape_shows_the_shapes_expected(
    fake: FakeTextGeneration, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(fake, "chat", "--message", "user:x", "--tools", '[{"fn": "get_weather"}]') == 2
    _, err = capsys.readouterr()
    assert err == (
        'error: tools[0]: expected {"type": "function", "function": {"name": ..., "description": ..., '
        '"parameters": {...}}} or {"name": ..., "description": ..., "parameters": {...}}, got an object '
        "with keys fn\n"
    )
    assert run(fake, "chat", "--message", "user:x", "--tools", "missing.json") == 2
    assert "--tools: cannot read missing.json" in capsys.readouterr().err
    assert fake.requests == []


def test_chat_stream(fake: FakeTextGeneration, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(fake, "chat", "--message", "user:x y", "--stream", "--max-tokens", "1") == 0
    out, err = capsys.readouterr()
    assert out == "x\n" and "finish_reason=length" in err


def test_chat_refuses_a_message_without_a_role(
    fake: FakeTextGeneration, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run(fake, "chat", "--message", "hello")
    assert exit_info.value.code == 2
    assert "expected ROLE:TEXT" in capsys.readouterr().err


def test_chat_needs_a_message(fake: FakeTextGeneration, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(fake, "chat") == 2
    assert capsys.readouterr().err.startswith("error: chat needs at least one message")
    assert fake.calls == 0


def test_run_takes_a_workers_ai_body(fake: FakeTextGeneration, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(fake, "run", '{"prompt": "Hello world", "max_tokens": 1}') == 0
    assert capsys.readouterr().out == "Hello\n"
    body = {"messages": [{"role": "user", "content": "p q"}], "stream": True}
    assert run(fake, "run", json.dumps(body), "--json") == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "".join(line["response"] for line in lines) == "p q"


def test_run_reads_the_body_from_stdin(
    fake: FakeTextGeneration, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO('{"prompt": "from stdin", "stream": true}'))
    assert run(fake, "run", "-") == 0
    assert capsys.readouterr().out == "from stdin\n"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("{not json", "error: body: invalid JSON: "),
        ("[1]", "error: body: expected an object, got list"),
        ('{"prompt": "x", "stream": 1}', "error: stream: expected a boolean, got 1"),
        ('{"promt": "x"}', "error: the body needs prompt or messages"),
    ],
)
def test_run_refuses_a_bad_body(
    fake: FakeTextGeneration, capsys: pytest.CaptureFixture[str], body: str, error: str
) -> None:
    assert run(fake, "run", body) == 2
    err = capsys.readouterr().err
    assert err.startswith(error) and err.count("\n") == 1
    assert fake.calls == 0


def test_adapters_lists_one_name_a_line(fake: FakeTextGeneration, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(fake, "adapters") == 0
    assert capsys.readouterr().out == "pirate\n"
    assert run(fake, "adapters", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"adapters": ["pirate"]}


def test_info(fake: FakeTextGeneration, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(fake, "info") == 0
    out = capsys.readouterr().out
    assert "model: @hf/mistral/mistral-7b-instruct-v0.2\n" in out
    assert "max_total_tokens: 4096\n" in out and "adapters: pirate\n" in out
    assert run(fake, "info", "--json") == 0
    assert json.loads(capsys.readouterr().out)["vocab_size"] == 32000


def test_an_invalid_argument_prints_one_line_naming_the_field(
    fake: FakeTextGeneration, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(fake, "generate", "Hi", "--max-tokens", "0") == 1
    out, err = capsys.readouterr()
    assert (out, err) == ("", "error: INVALID_ARGUMENT: max_tokens: must be >= 1, got 0\n")


def test_other_errors_print_the_code_and_message(
    fake: FakeTextGeneration, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(fake, "generate", "Hi", "--lora", "missing", "--stream") == 1
    assert capsys.readouterr().err == "error: NOT_FOUND: unknown adapter 'missing'\n"
    fake.fail(grpc.StatusCode.UNAVAILABLE, times=2)
    assert run(fake, "--max-retries", "1", "info") == 1
    assert capsys.readouterr().err == "error: UNAVAILABLE: planned UNAVAILABLE\n"
    assert fake.calls == 3


def test_an_error_mid_stream_ends_the_text_line_first(
    fake: FakeTextGeneration, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.fail_stream_after = 1
    assert run(fake, "generate", "a b c", "--stream") == 1
    out, err = capsys.readouterr()
    assert out == "a\n"
    assert err == (
        "error: UNAVAILABLE: draining (the stream broke after 1 chunk; a stream that has yielded "
        "text is never retried, so as not to deliver it twice)\n"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--timeout", "0", "info"],
        ["--timeout", "1e10", "info"],  # grpc ends a call with a deadline that far off at once
        ["--target", "", "info"],
        ["--token", "a b", "info"],
    ],
)
def test_bad_connection_options_are_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty target and a token with a space were tracebacks (exit 1)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_an_infinite_timeout_is_no_deadline(
    fake: FakeTextGeneration, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(fake, "--timeout", "inf", "generate", "Hi") == 0
    assert capsys.readouterr().out == "Hi\n"


def test_a_file_that_is_not_utf8_is_a_usage_error(
    fake: FakeTextGeneration, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    schema = tmp_path / "schema.json"
    schema.write_bytes(b'{"type": "\xff"}')
    assert run(fake, "generate", "Hi", "--json-schema", str(schema)) == 2
    assert capsys.readouterr().err == f"error: --json-schema: {schema} is not UTF-8 text (byte 10)\n"


def test_a_reader_that_stops_reading_ends_the_cli_quietly(fake: FakeTextGeneration) -> None:
    """`textgen ... | head`: the pipe breaks mid-stream; no traceback, the status a SIGPIPE gives."""
    process = subprocess.Popen(
        [sys.executable, "-m", "textgen", "--target", fake.target, "generate", "endless", "--stream"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.read(8)  # the stream has started
    process.stdout.close()
    assert process.wait(timeout=30) == 141
    assert b"Traceback" not in process.stderr.read()
