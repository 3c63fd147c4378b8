"""The committed stubs in sdk/textgen/v1 are what scripts/gen_proto.sh makes from proto/ now."""

from __future__ import annotations

import difflib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "sdk"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _stubs(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): path.read_text()
        for path in sorted((root / "textgen").rglob("*"))
        if path.is_file() and path.name.endswith(GENERATED_SUFFIXES)
    }


def test_committed_stubs_are_not_stale(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    fresh, committed = _stubs(tmp_path), _stubs(COMMITTED)
    assert fresh, "scripts/gen_proto.sh generated nothing"
    problems = [f"missing: sdk/{name}" for name in sorted(fresh.keys() - committed.keys())]
    problems += [
        f"left over (no .proto makes it): sdk/{name}" for name in sorted(committed.keys() - fresh.keys())
    ]
    for name in sorted(fresh.keys() & committed.keys()):
        if fresh[name] != committed[name]:
            diff = difflib.unified_diff(
                committed[name].splitlines(),
                fresh[name].splitlines(),
                f"sdk/{name}",
                "regenerated",
                lineterm="",
            )
            problems.append("\n".join(list(diff)[:40]))
    assert not problems, "stale stubs; run `make proto` (scripts/gen_proto.sh):\n" + "\n".join(problems)


def test_the_stubs_import_as_textgen_v1() -> None:
    code = "from textgen.v1 import textgen_pb2, textgen_pb2_grpc; textgen_pb2_grpc.TextGenerationStub"
    env = {**os.environ, "PYTHONPATH": str(COMMITTED)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env)
    assert (COMMITTED / "textgen" / "v1" / "__init__.py").is_file()
