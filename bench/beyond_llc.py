"""Batch-1 decode against the memory roofline, on a model whose weights are several times the LLC.

    python -m bench.beyond_llc [--dtype fp32] [--layers N] [--rounds 8] [--prompt 128] [--new 32]
                               [--threads 2]

`make bench`'s roofline row does not apply where the last-level cache holds a good part of the bench
model's weights (bench/roofline.py: below LLC_MULTIPLE times the cache), as on a Xeon with a 480 MiB
L3. Here the model has Mistral-7B's widths and, unless `--layers` says, the fewest layers that make
the weights one token reads at least that many times the LLC (two in fp32 there), made on first use
as bench.prefill_passes makes it (models/bench-wide-L<layers>-<dtype>, random weights). Each round
measures the machine's read bandwidth (a numpy sum over as many threads as the engine has, in this
process), then this engine's batch-1 decode (in a worker process), back to back; the share is weight bytes per
token times tokens/s over that bandwidth, and the report gives the rounds' median. The bytes per
token are counted from the graph: every initializer, a table read at one position (the embedding,
the rotary caches) as one row.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from pathlib import Path
from typing import Any

from .machine import last_level_cache, read_caches
from .membw import read_bandwidth
from .peers.client import Worker
from .prefill_passes import HEADS, HIDDEN, KV_HEADS, MLP, ensure_model
from .prompts import prompt_ids
from .roofline import LLC_MULTIPLE, roofline_share
from .stats import run_timing

REPO = Path(__file__).resolve().parent.parent
LOGS = REPO / "bench" / "logs" / "beyond_llc"
BANDWIDTH_BYTES = 1 << 30
# Bytes per weight of each export: MatMulNBits packs 4 or 8 bits and a scale per block of 32.
_WEIGHT_BYTES = {"fp32": 4.0, "int8": 1 + 4 / 32, "int4": 0.5 + 4 / 32}


def graph_bytes_per_token(model_onnx: Path) -> int:
    """Bytes of the initializers one decode step reads: all of them, a table read by position as one row."""
    import onnx

    graph = onnx.load(str(model_onnx), load_external_data=False).graph
    # Tables a step reads a row of: the embedding, and GroupQueryAttention's cos and sin caches.
    gathered = {node.input[0] for node in graph.node if node.op_type == "Gather"}
    gathered |= {
        name for node in graph.node if node.op_type == "GroupQueryAttention" for name in node.input[7:9]
    }
    total = 0
    for tensor in graph.initializer:
        elements = math.prod(tensor.dims)  # 1 for a scalar
        if tensor.name in gathered and tensor.dims:
            elements //= tensor.dims[0]  # one row
        total += elements * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return total


def layers_for(llc_bytes: int, dtype: str) -> int:
    """The fewest layers of Mistral-7B's widths whose weights, with the LM head, are LLC_MULTIPLE
    times `llc_bytes` (estimated from the shapes; the graph's own count is reported)."""
    head_dim = HIDDEN // HEADS
    per_layer = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV_HEADS * head_dim + 3 * HIDDEN * MLP
    lm_head = 32000 * HIDDEN
    weight = _WEIGHT_BYTES[dtype]
    return max(1, math.ceil((LLC_MULTIPLE * llc_bytes / weight - lm_head) / per_layer))


def one_round(
    engine: Worker, round_: int, prompt: int, new: int, threads: int, bytes_per_token: int
) -> dict[str, float]:
    """The read bandwidth (a numpy sum on `threads` threads, in this process, which waits while the
    engine runs: the two never overlap), then one batch-1 decode of the engine worker's model."""
    prompt_tokens = prompt_ids(prompt, random.Random(round_))
    read = statistics.median(read_bandwidth(threads, BANDWIDTH_BYTES, reps=3))  # bytes/s
    tok_s = run_timing(engine.call("generate", prompt_ids=prompt_tokens, new_tokens=new)).decode_tok_s
    return {"bandwidth": read, "tok_s": tok_s, "share": roofline_share(bytes_per_token, tok_s, read)}


def summarize(
    model: str, bytes_per_token: int, llc_bytes: int | None, rounds: list[dict[str, float]]
) -> dict[str, Any]:
    """The rounds with the model, its bytes per token against the LLC, and the median share."""
    shares = [r["share"] for r in rounds]
    return {
        "model": model,
        "bytes_per_token": bytes_per_token,
        "llc_bytes": llc_bytes,
        "times_llc": bytes_per_token / llc_bytes if llc_bytes else None,
        "rounds": rounds,
        "median_share": statistics.median(shares),
        "min_share": min(shares),
        "max_share": max(shares),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.beyond_llc",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dtype", choices=list(_WEIGHT_BYTES), default="fp32")
    parser.add_argument("--layers", type=int, help="layers of the model (default: enough to pass the LLC)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    parser.add_argument("--new", type=int, default=32, help="new tokens a round (default 32)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if min(args.rounds, args.prompt, args.threads) < 1 or args.new < 3:
        parser.error("--rounds, --prompt and --threads must be at least 1, --new at least 3")
    llc = last_level_cache(read_caches())
    if args.layers is None and llc is None:
        parser.error("this machine does not say how large its last-level cache is: give --layers")
    layers = args.layers if args.layers is not None else layers_for(llc.size_bytes if llc else 0, args.dtype)
    model = ensure_model(layers, args.dtype)
    bytes_per_token = graph_bytes_per_token(model / "model.onnx")
    here = Path(sys.executable)
    engine = Worker("engine", here, model, args.threads, REPO, LOGS / "engine.log")
    rounds: list[dict[str, float]] = []
    try:
        for round_ in range(args.rounds):
            rounds.append(one_round(engine, round_, args.prompt, args.new, args.threads, bytes_per_token))
            print(
                f"round {round_ + 1}/{args.rounds}: read {rounds[-1]['bandwidth'] / 1e9:.1f} GB/s, decode "
                f"{rounds[-1]['tok_s']:.2f} tok/s, share {rounds[-1]['share']:.0%}",
                flush=True,
            )
    finally:
        engine.close()
    report = summarize(str(model.relative_to(REPO)), bytes_per_token, llc.size_bytes if llc else None, rounds)
    print(json.dumps(report, indent=2))
    llc_text = (
        f"{report['times_llc']:.1f}x the {llc.size_bytes / 2**20:.0f} MiB LLC" if llc else "LLC unknown"
    )
    print(
        f"{report['model']}: {bytes_per_token / 1e9:.2f} GB a token ({llc_text}); decode at a median "
        f"{report['median_share']:.0%} of the memory roofline over {args.rounds} rounds",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
