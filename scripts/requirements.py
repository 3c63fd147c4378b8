"""Print pyproject.toml's requirements, one per line: the base dependencies plus the named extras.

`python scripts/requirements.py gpu pytest` gives what the onnxruntime-gpu virtualenv installs (the
Makefile's .venv-ort-gpu): the project's dependencies without the project itself, so that one
pyproject.toml stays the only place that names them. A name that is not an extra is passed through
as a requirement of its own (pytest above).
"""

from __future__ import annotations

import sys
from pathlib import Path

import tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def requirements(names: list[str]) -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    extras: dict[str, list[str]] = project["optional-dependencies"]
    lines = list(project["dependencies"])
    for name in names:
        lines += extras.get(name, [name])
    return list(dict.fromkeys(lines))  # keep the order, drop repeats


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1:])))
