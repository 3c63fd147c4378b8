"""Move the weights' host memory into 2 MiB pages (transparent huge pages, Linux).

Every decode step reads all the weights. ONNX Runtime allocates them with malloc, which on a kernel
whose transparent huge pages are `madvise` (Debian's and Ubuntu's default) maps them in 4 KiB pages:
a TLB miss every 4 KiB, and where the weights fit the last-level cache, a physical layout that
depends on which pages the kernel had free (of two identical processes, the one started first ran
3-5% slower). Once its session has loaded, the engine collapses every fully resident 2 MiB block of
the process's anonymous memory (`resident_blocks`, the weights among them) into a huge page
(`collapse`: `MADV_COLLAPSE`, Linux 6.1+, whatever the sysfs THP mode) and marks it `MADV_HUGEPAGE`
so that it stays one; a block already huge costs nothing. Only the blocks the load filled would be
tidier, but a load reuses memory freed before it, which a before-and-after diff would miss. Blocks
with pages never touched are left alone: collapsing them would fill the holes and grow the process.
The KV cache is allocated afterwards and left as it is (in huge pages it decoded no faster).

Batch-1 decode on the build machine (Xeon, 480 MiB L3): +9 to 12% on the bench model (228 MB of
fp32 weights, inside the L3), +5% on a 2.2 GB one (outside), +4% in int4. Nothing here is needed for
correctness: where the kernel refuses (an older one, no THP, memory too fragmented for a huge page)
the engine runs on 4 KiB pages as before, and the log says why.

The move copies every page. glibc 2.35+ can have malloc ask for huge pages itself, so that the
weights land in them as they load and the move finds nothing left to copy: `GLIBC_TUNABLES=
glibc.malloc.hugetlb=1` in the server's environment, read when the process starts (the Docker image
and `make serve` set it). A 2.2 GB model's engine was ready in a median 4.2 s with it against 6.5 s
without, the process as large either way; where the move took long without it, the log says so
(`malloc_hint`).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

HUGE_PAGE = 2 * 1024 * 1024  # x86-64 and arm64 (4 KiB base pages) PMD size
MADV_HUGEPAGE = 14  # <linux/mman.h>
MADV_COLLAPSE = 25  # Linux 6.1; Python's mmap module names it from 3.13 only
PROC_SELF_MAPS = Path("/proc/self/maps")
# The 2 MiB pages this module makes: Linux's, where base pages are 4 KiB (x86-64, most arm64 kernels).
AVAILABLE = sys.platform.startswith("linux") and mmap.PAGESIZE == 4096 and PROC_SELF_MAPS.exists()
_RESIDENT_BIT = bytes(byte & 1 for byte in range(256))
MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"  # malloc advises huge pages for what it maps (glibc 2.35+)
HINT_AFTER_S = 1.0  # a move this long is worth saying how to avoid


@dataclass(frozen=True)
class Collapsed:
    """What `collapse` did."""

    collapsed_bytes: int  # in blocks now backed by huge pages
    refused_bytes: int  # in fully resident blocks the kernel would not collapse
    refusal: str  # the first refusal's reason, "" if none
    seconds: float

    def describe(self) -> str:
        done = f"{self.collapsed_bytes / 2**20:.0f} MiB now in 2 MiB pages ({self.seconds:.2f} s)"
        if not self.refused_bytes:
            return done
        return f"{done}; {self.refused_bytes / 2**20:.0f} MiB left in 4 KiB pages: {self.refusal}"


def anonymous_regions(maps: str) -> Iterator[tuple[int, int]]:
    """(start, end) of the private, writable, anonymous mappings in a /proc/<pid>/maps text."""
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 5:
            continue
        span, perms, _offset, _device, inode = fields[:5]
        path = fields[5].strip() if len(fields) == 6 else ""
        if not perms.startswith("rw") or perms[3] != "p" or inode != "0" or path not in ("", "[heap]"):
            continue
        start, end = (int(bound, 16) for bound in span.split("-"))
        yield start, end


def huge_blocks(start: int, end: int) -> range:
    """The starts of the whole 2 MiB-aligned blocks inside [start, end)."""
    first = -(-start // HUGE_PAGE) * HUGE_PAGE
    return range(first, end - HUGE_PAGE + 1, HUGE_PAGE)


class _Kernel:
    """madvise and mincore through libc."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._madvise = libc.madvise
        self._madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        self._mincore = libc.mincore
        self._mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)

    def resident_blocks(self, start: int, end: int) -> Iterator[int]:
        """The whole 2 MiB blocks of [start, end) whose every page is resident."""
        blocks = huge_blocks(start, end)
        if not blocks:
            return
        pages_per_block = HUGE_PAGE // mmap.PAGESIZE
        resident = ctypes.create_string_buffer(len(blocks) * pages_per_block)  # a byte per page
        if self._mincore(blocks[0], len(blocks) * HUGE_PAGE, resident) != 0:
            return  # unmapped meanwhile
        pages = resident.raw.translate(_RESIDENT_BIT)  # mincore reserves the other bits
        for i, block in enumerate(blocks):
            if 0 not in pages[i * pages_per_block : (i + 1) * pages_per_block]:
                yield block

    def advise(self, block: int, advice: int) -> int:
        """0, or the errno madvise failed with."""
        return 0 if self._madvise(block, HUGE_PAGE, advice) == 0 else ctypes.get_errno()


def resident_blocks() -> frozenset[int]:
    """The fully resident 2 MiB blocks of this process's anonymous memory; empty where that cannot be
    known (not Linux, no /proc, pages other than 4 KiB)."""
    if not AVAILABLE:
        return frozenset()
    kernel = _Kernel()
    regions = anonymous_regions(PROC_SELF_MAPS.read_text())
    return frozenset(block for start, end in regions for block in kernel.resident_blocks(start, end))


def collapse(blocks: Collection[int]) -> Collapsed:
    """Back each block (from `resident_blocks`) with a huge page. The kernel copies the 4 KiB pages
    into it: 0.7 to 2.6 s a GiB on the build machine, the more the more it had to compact free
    memory for the 2 MiB pages (two threads were no faster)."""
    began = time.perf_counter()
    kernel = _Kernel()
    collapsed = 0
    refusals: list[int] = []
    for block in sorted(blocks):
        failure = kernel.advise(block, MADV_COLLAPSE)
        if failure != 0:
            refusals.append(failure)
            continue
        kernel.advise(block, MADV_HUGEPAGE)  # later faults and khugepaged keep it huge
        collapsed += HUGE_PAGE
    return Collapsed(
        collapsed_bytes=collapsed,
        refused_bytes=len(refusals) * HUGE_PAGE,
        refusal=_reason(refusals[0]) if refusals else "",
        seconds=time.perf_counter() - began,
    )


def malloc_hint(collapsed: Collapsed, glibc_tunables: str) -> str | None:
    """How to skip a move that took a while (`glibc_tunables`: the process's GLIBC_TUNABLES), or None
    where it was quick or malloc was already told about huge pages (whatever it was told)."""
    if collapsed.seconds < HINT_AFTER_S or "glibc.malloc.hugetlb" in glibc_tunables:
        return None
    return (
        f"GLIBC_TUNABLES={MALLOC_TUNABLE} in the server's environment has malloc put the weights in "
        f"2 MiB pages as they load (glibc 2.35+), which leaves this move ({collapsed.seconds:.1f} s) "
        "nothing to copy"
    )


def _reason(failure: int) -> str:
    if failure == errno.EINVAL:
        return "this kernel has no MADV_COLLAPSE (Linux 6.1+) or no transparent huge pages"
    if failure in (errno.ENOMEM, errno.EAGAIN):
        return "no free 2 MiB page (memory fragmented or short)"
    return os.strerror(failure)
