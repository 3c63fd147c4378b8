"""The virtualenvs that the README and the Makefile tell users to create never show up in `git status`."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_named_virtualenvs_are_ignored() -> None:
    texts = [REPO / "README.md", REPO / "Makefile", *sorted((REPO / "bench").glob("*.py"))]
    named = {m for path in texts for m in re.findall(r"(?:bench/)?\.venv[-\w]*", path.read_text())}
    named.add("bench/.venv-genai")  # bench/genai_env.py builds it under bench/
    assert {".venv", ".venv-gpu", ".venv-export"} <= named
    probes = [f"{name}/bin/python" for name in sorted(named)]
    result = subprocess.run(
        ["git", "check-ignore", "--no-index", *probes], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert set(probes) - set(result.stdout.split()) == set(), "not git-ignored"
