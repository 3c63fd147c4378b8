"""Batch-1 decode, this engine against onnxruntime-genai (and optionally another tree of this engine),
in short alternating rounds: a paired comparison that holds still on a machine whose speed moves.

    python -m bench.pair [--rounds 12] [--prompt 128] [--new 128] [--other-source DIR]
                         [--model DIR [--genai-model DIR]] [--streams N]

This machine's decode speed changes by up to 40% from one few-second spell to the next, so peers
measured a minute apart (as `make bench`'s rotation does) can differ by the machine alone. Here each
round sends the same prompt to every worker back to back (rotating who goes first), so the peers of
a round ran within about a second of each other, and the report is the median of each round's ratio.
`--other-source DIR` adds a worker running the `textgen_server` package found in DIR/server (a git
worktree of another commit, say) on the same model: a before/after of an engine change. `--model`
runs this engine on another exported model (one of models/bench-*, say), with `--other-source`'s
engine, or with genai on `--genai-model`, the genai builder's export of the same checkpoint.
`--streams N` compares this engine's gRPC server with `--other-source`'s instead (no genai): each
round sends the same N prompts to each as concurrent streams, and the report gives time to first
token (p50 and p99 over every stream of every round) and the aggregate decode rate, paired by round
(the window of `make bench`'s concurrency sweep).
Uses what `make bench` built: models/bench, bench/.venv-genai and bench/models/genai-bench-fp32.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path
from typing import Any

from .genai_env import MODELS as GENAI_MODELS
from .genai_env import VENV as GENAI_VENV
from .peers.client import Worker
from .prompts import prompt_ids, text_of_length
from .report import sweep_level
from .run import BENCH_MODEL, rotated
from .stats import paired_ratios, run_timing

REPO = Path(__file__).resolve().parent.parent
LOGS = REPO / "bench" / "logs" / "pair"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pair", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    parser.add_argument("--new", type=int, default=128, help="new tokens a round (default 128)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--other-source", type=Path, help="a tree of this repository whose engine to add")
    parser.add_argument("--model", type=Path, help="another model (with --other-source or --genai-model)")
    parser.add_argument(
        "--genai-model", type=Path, help="with --model: the genai builder's export of its checkpoint"
    )
    parser.add_argument(
        "--streams",
        type=int,
        default=0,
        help="with --other-source: N concurrent streams through each engine's gRPC server a round",
    )
    args = parser.parse_args(argv)
    if min(args.rounds, args.prompt, args.threads) < 1 or args.new < 3:
        parser.error("--rounds, --prompt and --threads must be at least 1, --new at least 3")
    if args.streams < 0:
        parser.error(f"--streams {args.streams}: must be at least 1 (or left out for batch-1 decode)")
    model = args.model.resolve() if args.model is not None else REPO / BENCH_MODEL
    if args.streams:
        if args.other_source is None or args.genai_model is not None:
            parser.error("--streams compares this engine with --other-source's (and no genai)")
        if not (model / "textgen.json").is_file():
            parser.error(f"{model}: no textgen.json there (run `make bench` once first for models/bench)")
        return _compare_streams(args, model)
    if args.genai_model is not None and args.model is None:
        parser.error("--genai-model goes with --model (the bench model's genai export is the default)")
    if args.model is not None and args.other_source is None and args.genai_model is None:
        parser.error("--model needs a peer on the same checkpoint: --other-source or --genai-model")
    if args.genai_model is not None and not (args.genai_model / "genai_config.json").is_file():
        parser.error(f"--genai-model {args.genai_model}: no genai_config.json there")
    genai_python = REPO / GENAI_VENV / "bin" / "python"
    genai_model = args.genai_model.resolve() if args.genai_model is not None else REPO / GENAI_MODELS["fp32"]
    with_genai = args.model is None or args.genai_model is not None
    if with_genai and not (genai_python.is_file() and genai_model.is_dir() and model.is_dir()):
        parser.error("run `make bench` once first: it builds models/bench and the genai virtualenv and model")
    if not (model / "textgen.json").is_file():
        parser.error(f"--model {args.model}: no textgen.json there")
    here = Path(sys.executable)
    workers = [Worker("engine", here, model, args.threads, REPO, LOGS / "engine.log")]
    if with_genai:
        workers.append(Worker("genai", genai_python, genai_model, args.threads, REPO, LOGS / "genai.log"))
    if args.other_source is not None:
        workers.append(
            Worker(
                "other",
                here,
                model,
                args.threads,
                REPO,
                LOGS / "other.log",
                peer="engine",
                source_paths=[args.other_source.resolve() / "server"],
            )
        )
    rng = random.Random(20240216)
    rates: list[dict[str, float]] = []
    try:
        for round_ in range(args.rounds):
            prompt = prompt_ids(args.prompt, rng)
            rates.append(
                {
                    w.name: run_timing(
                        w.call("generate", prompt_ids=prompt, new_tokens=args.new)
                    ).decode_tok_s
                    for w in rotated(workers, round_)
                }
            )
            print(
                f"round {round_ + 1}/{args.rounds}: "
                + ", ".join(
                    f"{name} {rate:.{0 if rate >= 100 else 1}f} tok/s" for name, rate in rates[-1].items()
                ),
                flush=True,
            )
    finally:
        for worker in workers:
            worker.close()
    comparisons = [("engine", "genai")] if with_genai else []
    if args.other_source is not None:
        comparisons += [("engine", "other")] + ([("other", "genai")] if with_genai else [])
    for numerator, denominator in comparisons:
        ratios = paired_ratios([r[numerator] for r in rates], [r[denominator] for r in rates])
        print(
            f"{numerator} ÷ {denominator}: median {statistics.median(ratios):.3f} "
            f"(rounds {min(ratios):.3f}–{max(ratios):.3f})"
        )
    return 0


def _compare_streams(args: argparse.Namespace, model: Path) -> int:
    """`args.streams` concurrent streams through this engine's gRPC server and --other-source's, the
    same prompts to both in each round (who goes first rotating)."""
    from textgen_server.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(model / "tokenizer.json")
    here = Path(sys.executable)
    sources = {"engine": [], "other": [args.other_source.resolve() / "server"]}
    workers = [
        Worker(
            name, here, model, args.threads, REPO, LOGS / f"{name}-grpc.log", peer="grpc", source_paths=paths
        )
        for name, paths in sources.items()
    ]
    rng = random.Random(20240216)
    levels: dict[str, list[list[dict[str, Any]]]] = {w.name: [] for w in workers}
    try:
        for worker in workers:  # warm: the first streams of a server pay its one-time costs
            worker.call("streams", prompts=["warm up"] * 2, new_tokens=4)
        for round_ in range(args.rounds):
            texts = [
                text_of_length(args.prompt - 1, tokenizer.encode, tokenizer.decode, rng)
                for _ in range(args.streams)
            ]
            for worker in rotated(workers, round_):
                levels[worker.name].append(worker.call("streams", prompts=texts, new_tokens=args.new))
            summary = {name: sweep_level(reps[-1:], args.new) for name, reps in levels.items()}
            print(
                f"round {round_ + 1}/{args.rounds}: "
                + ", ".join(
                    f"{name} {level['aggregate_decode_tok_s']['median']:.0f} tok/s, "
                    f"TTFT p50 {level['ttft_s']['p50'] * 1000:.0f} ms"
                    for name, level in summary.items()
                ),
                flush=True,
            )
    finally:
        for worker in workers:
            worker.close()
    summary = {name: sweep_level(reps, args.new) for name, reps in levels.items()}
    for name, level in summary.items():
        decode = level["aggregate_decode_tok_s"]
        print(
            f"{name}: {args.streams} streams, aggregate decode median {decode['median']:.0f} tok/s "
            f"({decode['min']:.0f}–{decode['max']:.0f}), TTFT p50 {level['ttft_s']['p50'] * 1000:.0f} ms, "
            f"p99 {level['ttft_s']['p99'] * 1000:.0f} ms"
        )
    ratios = paired_ratios(
        summary["engine"]["aggregate_decode_tok_s"]["samples"],
        summary["other"]["aggregate_decode_tok_s"]["samples"],
    )
    print(
        f"engine ÷ other, aggregate decode: median {statistics.median(ratios):.3f} "
        f"(rounds {min(ratios):.3f}–{max(ratios):.3f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
