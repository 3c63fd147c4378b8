"""What a folder the bench makes on first use was made from, written beside it (`.bench-stamp`): the
bench redoes the work when the stamp differs from what it would be made from now."""

from __future__ import annotations

import hashlib
from pathlib import Path

STAMP = ".bench-stamp"


def read(directory: Path) -> str | None:
    path = directory / STAMP
    return path.read_text(encoding="utf-8") if path.is_file() else None


def write(directory: Path, value: str) -> None:
    (directory / STAMP).write_text(value, encoding="utf-8")


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def files_fingerprint(folder: Path, pattern: str) -> str:
    """Name and content digest of the files matching `pattern`: changes when their bytes do, and not
    when the same bytes are written again (the demo checkpoint is rebuilt identically, and the
    models made from it need not be)."""
    return "".join(f"{p.name}:{_file_digest(p)}" for p in sorted(folder.glob(pattern)) if p.is_file())


def exporter_digest(repo: Path) -> str:
    """A digest of the exporter's source: a model the bench exported is current while it is unchanged."""
    digest = hashlib.sha256()
    for path in sorted((repo / "export" / "textgen_export").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:16]
