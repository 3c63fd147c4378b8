"""What a slot move of the host KV cache costs on Mistral-7B's shapes, on one copy thread and on more.

    python -m bench.kv_moves [--positions 512,3000] [--threads 1,2] [--repeats 7]

On the CPU every running stream waits while the scheduler moves a sequence's keys and values from one
slot to another (the last running sequence into a leaver's gap; a leaver into a free slot for the
prefix cache). The cache here is the server's own KVCache with Mistral-7B's shapes (32 layers, 8 KV
heads of 128, 4096 positions a slot, fp32 as CPU exports hold it) and two slots, 2 GiB; the config
comes from the tiny demo model's, widened (`make test` builds models/tiny). The report gives, per
move length and number of copy threads, the best of `--repeats` moves in ms and the bytes moved a
second. The cache is larger than any last-level cache, so a move runs at the memory's bandwidth.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from textgen_server.kv_cache import KVCache
from textgen_server.model_config import ModelConfig

REPO = Path(__file__).resolve().parent.parent
# Mistral-7B-Instruct-v0.2's cache shapes.
LAYERS, KV_HEADS, HEAD_DIM, MAX_LEN = 32, 8, 128, 4096


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.kv_moves",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--positions", default="512,3000", help="move lengths, comma-separated")
    parser.add_argument("--threads", default="1,2", help="copy thread counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "tiny", help="whose config to widen")
    args = parser.parse_args(argv)
    try:
        lengths = [int(p) for p in args.positions.split(",")]
        thread_counts = [int(t) for t in args.threads.split(",")]
    except ValueError:
        parser.error("--positions and --threads take comma-separated integers")
    if not all(1 <= n <= MAX_LEN for n in lengths) or min(thread_counts) < 1 or args.repeats < 1:
        parser.error(f"positions must be in 1..{MAX_LEN}, threads and repeats at least 1")
    if not (args.model / "textgen.json").is_file():
        parser.error(f"{args.model}: no model directory (`make test` builds models/tiny)")

    config = dataclasses.replace(
        ModelConfig.load(args.model),
        dtype="fp32",
        num_layers=LAYERS,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
    )
    rows = []
    for threads in thread_counts:
        cache = KVCache(
            args.model,
            config,
            slots=2,
            max_len=MAX_LEN,
            device="cpu",
            providers=["CPUExecutionProvider"],
            copy_threads=threads,
        )
        for length in lengths:
            cache.move(1, 0, length)  # first touch
            best = min(_timed(cache, length) for _ in range(args.repeats))
            moved = length * cache.position_bytes
            rows.append(
                {"threads": threads, "positions": length, "ms": best * 1000, "gb_s": moved / best / 1e9}
            )
            print(
                f"{length:5d} positions ({moved / 1e6:.0f} MB), {threads} copy thread(s): "
                f"{best * 1000:7.1f} ms, {moved / best / 1e9:.1f} GB/s",
                file=sys.stderr,
            )
        del cache
    print(json.dumps(rows, indent=2))
    return 0


def _timed(cache: KVCache, length: int) -> float:
    started = time.perf_counter()
    cache.move(1, 0, length)
    return time.perf_counter() - started


if __name__ == "__main__":
    raise SystemExit(main())
