"""How much more memory this process may take before something kills it.

Two bounds, whichever is lower: the host's available memory (psutil: MemAvailable on Linux, which
counts reclaimable page cache as free), and in a container the limit of every cgroup the process sits
in, less what that cgroup already holds. A container's limit is what the kernel's OOM killer
enforces, whatever the host has free. What a cgroup holds is counted as the kubelet counts a pod's
working set: usage less inactive file pages, which the kernel drops before it kills anything (the
model file just read sits there).

cgroup v2 (one hierarchy, `0::/path` in /proc/self/cgroup) and v1 (a `memory` controller line) are
both read; a cgroup without a limit, or none at all (a laptop), leaves the host's figure.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil

PROC_SELF_CGROUP = Path("/proc/self/cgroup")
CGROUP_FS = Path("/sys/fs/cgroup")
# cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit value; anything this large is it.
_V1_UNLIMITED = 2**62


@dataclass(frozen=True)
class CgroupMemory:
    path: str  # the cgroup, as /proc/self/cgroup names it
    limit: int
    working_set: int  # usage less inactive file pages

    @property
    def headroom(self) -> int:
        return max(0, self.limit - self.working_set)


@dataclass(frozen=True)
class Headroom:
    """The bytes this process may still take, and what bounds them."""

    host_available: int
    cgroups: tuple[CgroupMemory, ...]  # every enclosing cgroup that has a limit, innermost first

    @property
    def bytes(self) -> int:
        return min([self.host_available, *(c.headroom for c in self.cgroups)])

    def describe(self) -> str:
        """Where the bound comes from, for an error message."""
        tightest = min(self.cgroups, key=lambda c: c.headroom, default=None)
        if tightest is None or tightest.headroom >= self.host_available:
            return f"the host has {size(self.host_available)} available"
        return (
            f"cgroup {tightest.path} has a limit of {size(tightest.limit)} with {size(tightest.working_set)} "
            "in use"
        )


def size(nbytes: int) -> str:
    """Bytes for people: GiB from 1 GiB up, MiB below."""
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def headroom(
    host_available: int | None = None, proc_self_cgroup: Path = PROC_SELF_CGROUP, cgroup_fs: Path = CGROUP_FS
) -> Headroom:
    """The memory this process may still take (`host_available` None: ask psutil)."""
    available = psutil.virtual_memory().available if host_available is None else host_available
    return Headroom(available, tuple(_limited_cgroups(proc_self_cgroup, cgroup_fs)))


def _limited_cgroups(proc_self_cgroup: Path, cgroup_fs: Path) -> list[CgroupMemory]:
    try:
        lines = proc_self_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:  # not Linux, or no /proc
        return []
    found: list[CgroupMemory] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            found += _walk(cgroup_fs, path, "memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            found += _walk(
                cgroup_fs / "memory",
                path,
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
                "total_inactive_file",
            )
    return found


def _walk(root: Path, path: str, limit_file: str, usage_file: str, inactive_key: str) -> list[CgroupMemory]:
    """The cgroups from `path` up to the hierarchy's root that have a memory limit, innermost first.
    In a container with its own cgroup namespace `path` is "/" and the root is the container's
    cgroup; a path that is not mounted here (a v1 container shows the host's path) is skipped."""
    parts = [p for p in path.strip("/").split("/") if p]
    found = []
    for depth in range(len(parts), -1, -1):
        directory = root.joinpath(*parts[:depth])
        limit = _read_int(directory / limit_file)
        usage = _read_int(directory / usage_file)
        if limit is None or usage is None or limit >= _V1_UNLIMITED:
            continue
        inactive = _stat(directory / "memory.stat").get(inactive_key, 0)
        found.append(CgroupMemory("/" + "/".join(parts[:depth]), limit, max(0, usage - inactive)))
    return found


def _read_int(path: Path) -> int | None:
    """An integer file of the cgroup filesystem; None when absent, unreadable or "max" (no limit)."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat(path: Path) -> dict[str, int]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    pairs = (line.split() for line in lines)
    return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].isdigit()}
