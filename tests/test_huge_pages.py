"""The weights' host memory moved into 2 MiB pages: which mappings and blocks qualify, a block the
kernel collapses really backed by a huge page, holes never filled, and the engine's load found."""

from __future__ import annotations

import ctypes
import logging
import mmap
import re
import subprocess
import sys
from pathlib import Path

import pytest
from textgen_server.huge_pages import HUGE_PAGE, anonymous_regions, collapse, huge_blocks, resident_blocks

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
    region = mmap.mmap(-1, 12 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = ctypes.addressof(ctypes.c_char.from_buffer(region))
    blocks = list(huge_blocks(address, address + 12 * MiB))  # at least 5 whole blocks
    before = resident_blocks()
    for block in blocks[:2]:  # filled: every page written
        region[block - address : block - address + HUGE_PAGE] = b"\x01" * HUGE_PAGE
    for page in range(0, HUGE_PAGE, 2 * mmap.PAGESIZE):  # every other page of the third block
        region[blocks[2] - address + page] = 1
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
    assert region[blocks[1] - address + HUGE_PAGE - 1] == 1  # contents kept
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
