"""What the numbers were measured on: CPU, cores, last-level cache, library versions, load, date."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

CPU0_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")


def cpu_model(cpuinfo: str) -> str:
    """The first `model name` of /proc/cpuinfo's text ("unknown" when absent)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return "unknown"


@dataclass(frozen=True)
class Cache:
    """One cache the first CPU uses, as /sys/devices/system/cpu/cpu0/cache/index*/ describes it."""

    level: int
    type: str  # "Data", "Instruction" or "Unified"
    size_bytes: int  # one instance: what the CPUs sharing it can hold together
    shared_cpu_list: str  # e.g. "0-1": the CPUs that share this instance

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_cache_size(text: str) -> int:
    """Bytes of a sysfs cache size: "32768K", "1M", "512" (the kernel writes K; the rest for safety)."""
    text = text.strip()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1:].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def last_level_cache(caches: list[Cache]) -> Cache | None:
    """The highest-level cache that holds data (instruction caches never hold weights); None if none."""
    holding_data = [c for c in caches if c.type in ("Data", "Unified")]
    return max(holding_data, key=lambda c: c.level) if holding_data else None


def read_caches(directory: Path = CPU0_CACHES) -> list[Cache]:
    """The caches of cpu0 from sysfs; empty where the kernel does not expose them."""
    caches = []
    for index in sorted(directory.glob("index[0-9]*")):
        try:
            fields = {
                name: (index / name).read_text(encoding="utf-8").strip()
                for name in ("level", "type", "size", "shared_cpu_list")
            }
            caches.append(
                Cache(
                    level=int(fields["level"]),
                    type=fields["type"],
                    size_bytes=parse_cache_size(fields["size"]),
                    shared_cpu_list=fields["shared_cpu_list"],
                )
            )
        except (OSError, ValueError):
            continue  # an entry without a size (some VMs): not one to count on
    return caches


def machine_info(threads: int) -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text(encoding="utf-8", errors="replace") if cpuinfo.is_file() else ""
    return {
        "cpu": cpu_model(text) if text else platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "threads_per_peer": threads,
        "last_level_cache": llc.to_dict() if (llc := last_level_cache(read_caches())) else None,
        "memory_gib": _memory_gib(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            name: _version(name) for name in ("onnxruntime", "torch", "transformers", "numpy", "grpcio")
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": list(os.getloadavg()),
        "commit": _commit(),
    }


def _commit() -> str:
    """The checkout's commit, "+changes" when its tracked files differ from it: what was measured."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, check=False
        )

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode != 0:
        return "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("+changes" if changed else "")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _memory_gib() -> float | None:
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
    return round(pages / (1 << 30), 1)
