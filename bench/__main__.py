"""`python -m bench` (what `make bench` runs): measure everything, write bench/results/, print the table.

python -m bench              the full run: bench/results/latest.json, latest.md and the PNGs
python -m bench --quick      a smoke run with few, short repetitions, written to bench/results/quick/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .config import FULL, QUICK

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="few, short repetitions (a smoke run, ~3 min)")
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="threads for every peer: ORT intra-op, torch, genai, the server (default 2)",
    )
    parser.add_argument(
        "--reps", type=int, default=None, help="repetitions of every batch-1 case and of the sweep"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=30 * 60,
        help="wall-time budget from start, setup included except the one-time llama.cpp build: "
        "repetitions past it are skipped (the first of each is always run; default 1800)",
    )
    parser.add_argument("--no-genai", action="store_true", help="skip onnxruntime-genai (no virtualenv made)")
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers")
    parser.add_argument(
        "--no-llamacpp", action="store_true", help="skip llama.cpp (nothing downloaded or built)"
    )
    parser.add_argument(
        "--no-before",
        action="store_true",
        help="skip the engine before v2 (no old source tree taken from git, no export in its format)",
    )
    parser.add_argument(
        "--no-beyond-llc",
        action="store_true",
        help="skip the memory roofline on a model several times the last-level cache (made on first "
        "use: about 2 GB on disk where the LLC is 480 MiB)",
    )
    parser.add_argument(
        "--llamacpp-omp-wait",
        choices=["auto", "passive", "default"],
        default="auto",
        help="OpenMP wait policy of llama-bench: auto (default: the faster of the other two, measured "
        "at the start of the run), passive (robust when other processes share the cores) or libgomp's "
        "default spin-then-sleep (faster on an otherwise idle machine)",
    )
    parser.add_argument(
        "--only",
        choices=["lora", "constrained"],
        default=None,
        help="one section alone, to bench/results/<section>/: lora (16 streams, all base vs four adapters "
        "mixed) or constrained (1 and 16 streams with and without a JSON schema)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default bench/results, or bench/results/quick with --quick)",
    )
    args = parser.parse_args(argv)
    if args.threads < 1 or (args.reps is not None and args.reps < 1):
        parser.error("--threads and --reps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = QUICK if args.quick else FULL
    peers = tuple(
        p
        for p in config.peers
        if not (p == "genai" and args.no_genai)
        and not (p == "transformers" and args.no_transformers)
        and not (p == "llamacpp" and args.no_llamacpp)
        and not (p == "before" and args.no_before)
    )
    cases = (
        config.cases
        if args.reps is None
        else tuple(dataclasses.replace(c, reps=args.reps) for c in config.cases)
    )
    config = dataclasses.replace(
        config,
        threads=args.threads,
        peers=() if args.only else peers,
        cases=cases,
        sweep_reps=args.reps or config.sweep_reps,
        llamacpp_omp_wait=args.llamacpp_omp_wait,
        lora_reps=args.reps or config.lora_reps,
        beyond_llc_rounds=0 if args.no_beyond_llc else config.beyond_llc_rounds,
        only=args.only,
    )
    folder = "quick" if args.quick else args.only or ""
    out = args.out or (REPO / "bench/results" / folder)
    out.mkdir(parents=True, exist_ok=True)

    from .plots import plot_all
    from .report import markdown, section_markdown, summarize
    from .run import Runner

    raw = Runner(config, REPO, REPO / "bench/logs", args.budget_s).run()
    summary = summarize(raw)
    table = section_markdown(summary, args.only) if args.only else markdown(summary)
    (out / "latest.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "latest.md").write_text(table, encoding="utf-8")
    plots = [] if args.only else plot_all(summary, out)
    print()
    print(table)
    print(f"wrote {out / 'latest.json'}, {out / 'latest.md'}" + "".join(f", {p}" for p in plots))
    print(f"wall time {raw.wall_s:.0f} s (setup {raw.setup_s:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
