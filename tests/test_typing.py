"""The server and the exporter are held to mypy --strict like the SDK (tests/test_sdk.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_strict_passes_on_server_and_exporter() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "server/textgen_server", "export/textgen_export"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
