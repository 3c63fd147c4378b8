"""The README's SDK and CLI examples: type-checked with mypy --strict and run against a live server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from server_harness import ServerThread

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")
BIN = Path(sys.executable).parent


def _blocks(marker: str, language: str) -> list[str]:
    """The fenced blocks of `language` from the marker up to the next second-level heading."""
    section = README[README.index(marker) :]
    section = section.split("\n## ", 1)[0]
    return [part.split("```", 1)[0] for part in section.split(f"```{language}\n")[1:]]


PYTHON_EXAMPLES = _blocks("<!-- sdk-examples", "python")
CLI_LINES = [
    line
    for block in _blocks("<!-- cli-examples", "sh")
    for line in block.splitlines()
    if line and not line.startswith("#")
]


def test_readme_has_examples() -> None:
    assert len(PYTHON_EXAMPLES) == 4
    assert any("tool_calls" in block and "response_format" in block for block in PYTHON_EXAMPLES)
    assert any("AsyncClient" in block for block in PYTHON_EXAMPLES)
    assert any("dns:///" in block for block in PYTHON_EXAMPLES)
    assert len(CLI_LINES) >= 6


def test_python_examples_pass_mypy_strict(tmp_path: Path) -> None:
    files = []
    for index, block in enumerate(PYTHON_EXAMPLES):
        path = tmp_path / f"readme_example_{index}.py"
        path.write_text(block, encoding="utf-8")
        files.append(str(path))
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--config-file", str(REPO / "pyproject.toml"), *files],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("index", range(len(PYTHON_EXAMPLES)))
def test_python_example_runs(server: ServerThread, index: int) -> None:
    code = PYTHON_EXAMPLES[index].replace("localhost:50051", server.target)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    if "field_violations" in code:
        assert "max_tokens: must be at least 1" in result.stdout


@pytest.mark.parametrize("line", CLI_LINES)
def test_cli_example_runs(server: ServerThread, line: str) -> None:
    env = {**os.environ, "TEXTGEN_TARGET": server.target, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", "-c", line], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    if "--max-tokens 0" in line:
        assert result.returncode == 1
        assert result.stderr.strip() == "error: INVALID_ARGUMENT: max_tokens: must be at least 1, got 0"
    else:
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() or result.stderr.strip()


@pytest.mark.parametrize(
    "command",
    [
        ["textgen-server"],
        ["textgen-healthcheck"],
        ["textgen-export", "model"],
        ["textgen-export", "demo"],
        ["textgen-export", "lora"],
    ],
    ids=" ".join,
)
def test_every_command_line_option_is_in_the_readme(command: list[str]) -> None:
    """The README's synopses keep up with the parsers: each option `--help` lists is documented."""
    help_text = subprocess.run(
        [str(BIN / command[0]), *command[1:], "--help"], check=True, capture_output=True, text=True
    ).stdout
    options = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", help_text)) - {"--help"}
    assert options, help_text
    missing = [option for option in options if not re.search(rf"(?<![\w-]){option}(?![\w-])", README)]
    assert sorted(missing) == []
