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
    """Name, size and modification time of the files matching `pattern`: changes when they do."""
    return "".join(
        f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(folder.glob(pattern))
    )
