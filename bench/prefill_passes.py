"""A long prompt prefilled in one pass and in passes of a few hundred tokens, on Mistral-7B's widths.

    python -m bench.prefill_passes [--layers 2] [--dtype int4] [--prompt 3072] [--passes 3072,512]
                                   [--rounds 4]

Why the scheduler cuts every prompt into passes of `--prefill-chunk-tokens` on the CPU
(`SchedulerLimits.largest_prefill_pass`): the time a prompt's prefill takes, and how much the
process grows (the working memory onnxruntime's arena keeps after the passes), for each pass size.
The model has Mistral-7B's layer shapes (hidden 4096, 32 heads, 8 KV heads, MLP 14336) and fewer
layers, random weights; it is made on first use in models/bench-wide-L<layers>-<dtype> (without
its checkpoint). Each measurement runs in a process of its own, so that every one starts from a
fresh arena; the rounds alternate the pass sizes, and the report gives, per pass size, the median
time and the median growth. Time per layer is what compares (the embedding and LM head are a
larger share of a model this shallow).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# Mistral-7B's widths (export/textgen_export/demo.py's "7b").
HIDDEN, HEADS, KV_HEADS, MLP = 4096, 32, 8, 14336


def ensure_model(layers: int, dtype: str) -> Path:
    folder = REPO / "models" / f"bench-wide-L{layers}-{dtype}"
    if (folder / "textgen.json").is_file():
        return folder
    from textgen_export.demo import build_demo
    from textgen_export.random_weights import DemoSize

    print(f"making {folder.relative_to(REPO)} (random weights, {layers} layers of Mistral-7B's widths)")
    shape = DemoSize(HIDDEN, layers, HEADS, KV_HEADS, MLP)
    build_demo(folder, size=shape, dtype=dtype, overwrite=True, quality_check=False)
    shutil.rmtree(folder / "checkpoint", ignore_errors=True)  # 4 GB of fp32 weights per 2 layers
    return folder


def measure(model: Path, prompt: int, pass_tokens: int, threads: int) -> dict[str, float]:
    """In this process: one prompt of `prompt` tokens in passes of `pass_tokens`; seconds, MiB grown."""
    import numpy as np
    import psutil
    from textgen_server.engine import Engine

    engine = Engine(model, provider="cpu", threads=threads, slots=1)
    ids = np.random.default_rng(0).integers(100, engine.config.vocab_size, prompt).tolist()
    process = psutil.Process()
    before, started = process.memory_info().rss, time.perf_counter()
    for begin in range(0, prompt, pass_tokens):
        engine.prefill(0, ids[begin : begin + pass_tokens], start=begin)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "grown_mib": (process.memory_info().rss - before) / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.prefill_passes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", choices=["fp32", "int4", "int8"], default="int4")
    parser.add_argument(
        "--prompt", type=int, default=3072, help="prompt tokens (default 3072, the card's limit)"
    )
    parser.add_argument("--passes", default="3072,512", help="pass sizes to compare (default 3072,512)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)  # a child: one pass size
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.passes.split(",")]
    if min(args.layers, args.prompt, args.rounds, args.threads, *sizes) < 1:
        parser.error("--layers, --prompt, --rounds, --threads and every pass size must be at least 1")
    model = ensure_model(args.layers, args.dtype)
    if args.measure is not None:
        print(json.dumps(measure(model, args.prompt, args.measure, args.threads)))
        return 0
    runs: dict[int, list[dict[str, float]]] = {size: [] for size in sizes}
    child = [sys.executable, "-m", "bench.prefill_passes", *(argv if argv is not None else sys.argv[1:])]
    for round_ in range(args.rounds):
        for size in sizes if round_ % 2 == 0 else sizes[::-1]:
            out = subprocess.run([*child, "--measure", str(size)], check=True, capture_output=True, text=True)
            runs[size].append(json.loads(out.stdout.splitlines()[-1]))
            print(
                f"round {round_ + 1}/{args.rounds}, passes of {size}: {_describe(runs[size][-1])}", flush=True
            )
    print(
        f"\n{args.prompt}-token prompt, {args.layers} layers of Mistral-7B's widths, {args.dtype}, {args.threads} threads:"
    )
    first = sizes[0]
    for size in sizes:
        seconds = statistics.median(r["seconds"] for r in runs[size])
        grown = statistics.median(r["grown_mib"] for r in runs[size])
        against = statistics.median(r["seconds"] for r in runs[first])
        print(
            f"passes of {size}: {seconds:.2f} s ({seconds / args.layers:.2f} s a layer, {seconds / against:.3f}x "
            f"passes of {first}), the process grew by {grown:.0f} MiB"
        )
    return 0


def _describe(run: dict[str, Any]) -> str:
    return f"{run['seconds']:.2f} s, grew {run['grown_mib']:.0f} MiB"


if __name__ == "__main__":
    sys.exit(main())
