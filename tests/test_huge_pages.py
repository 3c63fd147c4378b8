"""The weights' host memory moved into 2 MiB pages: which mappings and blocks qualify, a block the
kernel collapses really backed by a huge page, holes never filled, and the engine's load found."""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from textgen_server.huge_pages import (
    HUGE_PAGE,
    MALLOC_TUNABLE,
    Collapsed,
    anonymous_regions,
    collapse,
    huge_blocks,
    malloc_hint,
    resident_blocks,
)

MiB = 2**20

MAPS = """\
55d0c0000000-55d0c0400000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000800000 rw-p 00000000 00:00 0 
7f0000800000-7f0000a00000 rw-p 00000000 00:00 0
7f0001000000-7f0001400000 r--p 00000000 00:00 0 
7f0002000000-7f0002400000 rw-s 00000000 00:01 1234                       /dev/zero (deleted)
7f0003000000-7f0003400000 rw-p 00001000 fd:01 5678                       /usr/lib/libonnxruntime.so
7ffc00000000-7ffc00400000 rw-p 00000000 00:00 0                          [stack]
"""


def test_only_private_writable_anonymous_mappings_and_the_heap_qualify() -> None:
    assert list(anonymous_regions(MAPS)) == [
        (0x55D0C0000000, 0x55D0C0400000),
        (0x7F0000000000, 0x7F0000800000),
        (0x7F0000800000, 0x7F0000A00000),
    ]


@pytest.mark.parametrize(
    ("start", "end", "blocks"),
    [
        (0, 4 * MiB, [0, 2 * MiB]),
        (4096, 4 * MiB, [2 * MiB]),  # the block the start falls in is not whole
        (0, 4 * MiB - 4096, [0]),
        (4096, 2 * MiB + 4096, []),  # 2 MiB long, but over a block boundary
    ],
)
def test_only_whole_aligned_blocks_are_collapsed(start: int, end: int, blocks: list[int]) -> None:
    assert list(huge_blocks(start, end)) == blocks


def smaps_between(start: int, end: int) -> dict[str, int]:
    """The kB fields of /proc/self/smaps summed over the mappings inside [start, end) (madvise splits
    a mapping where its advice changes)."""
    fields: dict[str, int] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        span = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            inside = start <= int(span[1], 16) and int(span[2], 16) <= end
        elif inside and line.endswith(" kB"):
            name, value, _ = line.split()
            fields[name.rstrip(":")] = fields.get(name.rstrip(":"), 0) + int(value)
    return fields


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc")
def test_filled_blocks_become_huge_pages_and_holes_stay_holes() -> None:
    region = mmap.mmap(-1, 14 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    # A megabyte of no access at each end: the kernel then never merges the 12 MiB between with a
    # mapping made next to it later (the allocator's, while this test reads smaps), which would take
    # part of it out of the mappings counted below.
    mprotect = ctypes.CDLL(None, use_errno=True).mprotect
    mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    prot_none = 0  # <sys/mman.h>; Python's mmap module names only PROT_READ and PROT_WRITE
    assert mprotect(base, MiB, prot_none) == 0 and mprotect(base + 13 * MiB, MiB, prot_none) == 0
    address = base + MiB
    blocks = list(huge_blocks(address, address + 12 * MiB))  # at least 5 whole blocks
    before = resident_blocks()
    for block in blocks[:2]:  # filled: every page written
        region[block - base : block - base + HUGE_PAGE] = b"\x01" * HUGE_PAGE
    for page in range(0, HUGE_PAGE, 2 * mmap.PAGESIZE):  # every other page of the third block
        region[blocks[2] - base + page] = 1
    filled = (resident_blocks() - before) & set(blocks)  # other memory of this process fills too
    assert filled == set(blocks[:2])
    rss_before = smaps_between(address, address + 12 * MiB)["Rss"]
    outcome = collapse(filled)
    if outcome.refused_bytes:
        pytest.skip(f"the kernel would not collapse: {outcome.refusal}")
    assert outcome.collapsed_bytes == 2 * HUGE_PAGE
    after = smaps_between(address, address + 12 * MiB)
    assert after["AnonHugePages"] == 2 * HUGE_PAGE // 1024
    assert after["Rss"] == rss_before  # the half-written block was left as it was
    assert region[blocks[1] - base + HUGE_PAGE - 1] == 1  # contents kept
    region.close()


ENGINE_IN_A_FRESH_PROCESS = """
import sys
from pathlib import Path
from textgen_server.engine import Engine
engine = Engine(Path(sys.argv[1]), provider="cpu", slots=1)
rollup = dict(line.split()[:2] for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
outcome = engine.huge_pages
print(outcome.collapsed_bytes, outcome.refusal or "-", engine.cache.nbytes, rollup["AnonHugePages:"], sep="\\t")
"""


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux's /proc")
def test_the_engine_moves_its_weights_into_huge_pages(tiny_model_dir: Path) -> None:
    # A process of its own: this one's other memory (torch, the exporter's) would be collapsed too.
    result = subprocess.run(
        [sys.executable, "-c", ENGINE_IN_A_FRESH_PROCESS, str(tiny_model_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    collapsed, refusal, cache_bytes, huge_kib = result.stdout.split("\t")
    if int(collapsed) == 0:
        pytest.skip(f"the kernel would not collapse: {refusal}")
    # numpy asks for huge pages for the KV cache by itself; the weights are there only if collapsed.
    weights = (tiny_model_dir / "model.onnx").stat().st_size
    assert int(huge_kib) * 1024 >= int(cache_bytes) + weights


def test_huge_pages_can_be_turned_off(tiny_model_dir: Path) -> None:
    from textgen_server.__main__ import parse_args
    from textgen_server.engine import Engine

    base = ["--model-dir", str(tiny_model_dir)]
    assert parse_args(base).huge_pages is True
    assert parse_args([*base, "--no-huge-pages"]).huge_pages is False
    assert Engine(tiny_model_dir, provider="cpu", slots=1, huge_pages=False).huge_pages is None


def test_where_huge_pages_do_not_exist_the_log_says_so(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from textgen_server import engine as engine_module

    monkeypatch.setattr(engine_module, "huge_pages_available", False)  # as on macOS, or 64 KiB pages
    with caplog.at_level(logging.INFO, logger="textgen_server.engine"):
        engine = engine_module.Engine(tiny_model_dir, provider="cpu", slots=1)
    assert engine.huge_pages is None
    assert "2 MiB pages need Linux and 4 KiB base pages" in caplog.text


def test_a_long_move_says_how_to_skip_it_unless_malloc_was_told() -> None:
    slow, quick = Collapsed(2 << 30, 0, "", seconds=3.7), Collapsed(240 << 20, 0, "", seconds=0.3)
    hint = malloc_hint(slow, "")
    assert hint is not None and f"GLIBC_TUNABLES={MALLOC_TUNABLE}" in hint and "(3.7 s)" in hint
    assert malloc_hint(slow, "glibc.malloc.arena_max=2") is not None  # other tunables: still worth it
    assert malloc_hint(quick, "") is None
    assert malloc_hint(slow, MALLOC_TUNABLE) is None
    assert malloc_hint(slow, "glibc.malloc.hugetlb=0") is None  # asked for no huge pages: not our call


ENGINE_WITHOUT_THE_MOVE = """
import sys
from pathlib import Path
from textgen_server.engine import Engine
engine = Engine(Path(sys.argv[1]), provider="cpu", slots=1, huge_pages=False)
rollup = dict(line.split()[:2] for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
print(rollup["AnonHugePages:"])
"""


def _glibc_version() -> tuple[int, ...]:
    name, _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
    return tuple(int(part) for part in version.split(".")) if name == "glibc" else ()


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux's /proc")
@pytest.mark.skipif(_glibc_version() < (2, 35), reason="glibc.malloc.hugetlb needs glibc 2.35+")
@pytest.mark.skipif(
    "[never]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text(encoding="utf-8")
    if Path("/sys/kernel/mm/transparent_hugepage/enabled").exists()
    else True,
    reason="transparent huge pages are off",
)
def test_with_the_malloc_tunable_the_weights_load_into_huge_pages(tiny_model_dir: Path) -> None:
    """What the Docker image and `make serve` set: the weights are in 2 MiB pages with no move at all
    (without it, in the kernel's default `madvise` mode, such a process had none)."""
    result = subprocess.run(
        [sys.executable, "-c", ENGINE_WITHOUT_THE_MOVE, str(tiny_model_dir)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "GLIBC_TUNABLES": MALLOC_TUNABLE},
    )
    weights = (tiny_model_dir / "model.onnx").stat().st_size
    assert int(result.stdout) * 1024 >= weights
