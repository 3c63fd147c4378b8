"""Running streams while other clients send requests that are costly to validate, through the server.

    python -m bench.heavy_requests [--model models/bench] [--streams 8] [--new 160] [--rounds 3]
                                   [--rate 4] [--other-source DIR]

A request is validated, tokenized and its grammar compiled before it reaches the scheduler: a chat
of 43,000 characters takes about 13 ms to tokenize (and is then refused, its tokens past
max_input_length), a response_format schema of 30 KB bounding 300 numbers about 140 ms to compile.
Where that work holds the event loop, or the GIL, every running stream waits for it. Each round
runs `--streams` greedy streams twice: alone (quiet), then while such requests arrive at `--rate`
a second, each sent without waiting for the last, until the streams end (heavy: the same load
whatever the server under test). The report gives the streams' inter-token gaps, pooled (p50, p99,
max and mean, in ms), for each phase, and the median over rounds of p99 heavy ÷ p99 quiet.
`--other-source DIR` runs the same rounds on the `textgen_server` of another tree (a git worktree of
another commit), alternating with this one: a before/after. Each round runs in a process of its own
(so no tree's worker is always the first started), with the in-process gRPC server of
bench/grpc_load.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from .stats import inter_token_gaps, percentile

REPO = Path(__file__).resolve().parent.parent
HEAVY_KINDS = ("chat", "schema")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.heavy_requests",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", type=Path, default=REPO / "models" / "bench")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--new", type=int, default=160, help="new tokens a stream (default 160)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=4.0, help="heavy requests a second (default 4)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--other-source", type=Path, help="a tree of this repository to compare with")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: the tree to run
    args = parser.parse_args(argv)
    if min(args.streams, args.rounds, args.threads) < 1 or args.new < 8 or args.rate <= 0:
        parser.error("--streams, --rounds and --threads must be at least 1, --new at least 8, --rate above 0")
    if not (args.model / "textgen.json").is_file():
        parser.error(f"{args.model}: no model directory (`make bench` builds models/bench)")
    if args.worker is not None:
        print(json.dumps(_worker(args)))
        return 0
    trees = {"this": REPO}
    if args.other_source is not None:
        if not (args.other_source / "server" / "textgen_server").is_dir():
            parser.error(f"{args.other_source}: not a tree of this repository")
        trees["other"] = args.other_source.resolve()
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    order = list(trees)
    for round_ in range(args.rounds):
        for name in order[round_ % len(order) :] + order[: round_ % len(order)]:
            print(
                f"round {round_ + 1}/{args.rounds}: {name} ({trees[name]}) ...", file=sys.stderr, flush=True
            )
            results[name].append(_run_worker(args, trees[name]))
    report = {name: _summary(runs) for name, runs in results.items()}
    print(json.dumps(report, indent=2))
    for name, summary in report.items():
        print(
            f"{name}: quiet p50 {summary['quiet']['p50_ms']:.1f} p99 {summary['quiet']['p99_ms']:.1f} "
            f"max {summary['quiet']['max_ms']:.1f} mean {summary['quiet']['mean_ms']:.1f} ms; "
            f"heavy p50 {summary['heavy']['p50_ms']:.1f} p99 {summary['heavy']['p99_ms']:.1f} "
            f"max {summary['heavy']['max_ms']:.1f} mean {summary['heavy']['mean_ms']:.1f} ms; "
            f"p99 heavy/quiet {summary['p99_heavy_over_quiet']:.2f}x; "
            f"{summary['heavy_requests']} heavy requests",
            file=sys.stderr,
        )
    return 0


def _run_worker(args: argparse.Namespace, tree: Path) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "bench.heavy_requests", "--worker", str(tree), "--model", str(args.model),
        "--streams", str(args.streams), "--new", str(args.new), "--rate", str(args.rate),
        "--threads", str(args.threads),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the worker for {tree} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def pooled(phase: str) -> dict[str, float]:
        gaps = [gap for run in runs for gap in run[phase]]
        return {
            "p50_ms": percentile(gaps, 50) * 1000,
            "p99_ms": percentile(gaps, 99) * 1000,
            "max_ms": max(gaps) * 1000,
            "mean_ms": statistics.fmean(gaps) * 1000,
        }

    ratios = [percentile(run["heavy"], 99) / percentile(run["quiet"], 99) for run in runs]
    return {
        "quiet": pooled("quiet"),
        "heavy": pooled("heavy"),
        "p99_heavy_over_quiet": statistics.median(ratios),
        "p99_heavy_over_quiet_rounds": ratios,
        "heavy_requests": sum(run["heavy_requests"] for run in runs),
        "heavy_codes": [run["heavy_codes"] for run in runs],
        "servers": sorted({run["server"] for run in runs}),
    }


# -- the worker: one tree's server, in this process ------------------------------------------------


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    tree: Path = args.worker
    sys.path[:0] = [str(tree / "server"), str(tree / "sdk")]  # that tree's server, not this one's
    from .grpc_load import GrpcPeer

    peer = GrpcPeer(str(args.model), args.threads)
    try:
        prompts = [f"Stream {i} tells a long story about the sea" for i in range(args.streams)]
        peer.streams(prompts[:1], 16)  # warm-up
        quiet = peer.streams(prompts, args.new)
        heavy, sent = peer.loop.run_until_complete(_heavy_phase(peer, prompts, args.new, args.rate))
    finally:
        peer.close()
    import textgen_server

    return {
        "server": str(Path(textgen_server.__file__).parent),  # which tree's server ran
        "quiet": _gaps(quiet),
        "heavy": _gaps(heavy),
        "heavy_requests": sum(sent.values()),
        "heavy_codes": sent,
    }


def _gaps(streams: list[dict[str, Any]]) -> list[float]:
    """Time between consecutive tokens of each stream, pooled."""
    return [gap for stream in streams for gap in inter_token_gaps(stream["token_times"])]


async def _heavy_phase(
    peer: Any, prompts: list[str], new_tokens: int, rate: float
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    import grpc

    rng = random.Random(0)
    # Built before they are due, so that building them costs the streams nothing.
    requests = [_heavy_request(kind, rng) for kind in HEAVY_KINDS]

    async def heavy_requests(stub: Any, streams: asyncio.Future[Any]) -> dict[str, int]:
        """Sends at `rate` a second, each without waiting for the last, until the streams end."""
        codes: dict[str, int] = {}

        async def send(request: Any) -> None:
            try:
                await stub.Generate(request)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            codes[code] = codes.get(code, 0) + 1

        sent: list[asyncio.Task[None]] = []
        while not streams.done():
            sent.append(asyncio.ensure_future(send(requests[len(sent) % len(requests)])))
            await asyncio.wait([streams], timeout=1 / rate)
        await asyncio.gather(*sent)
        return codes

    result: tuple[list[dict[str, Any]], dict[str, int]] = await peer.while_streaming(
        prompts, new_tokens, heavy_requests
    )
    return result


def _heavy_request(kind: str, rng: random.Random) -> Any:
    from textgen.v1 import textgen_pb2 as pb

    if kind == "chat":
        # 7 turns of 6,100 characters: within the character check (max_input_length x 16), so it is
        # tokenized, and then refused for its tokens.
        def words() -> str:
            return " ".join(rng.choice(("sea", "wind", "harbour", "lantern", "salt")) for _ in range(1000))[
                :6100
            ]

        roles = ["user", "assistant"] * 3 + ["user"]
        return pb.GenerateRequest(
            chat=pb.Chat(messages=[pb.Message(role=role, content=words()) for role in roles]), max_tokens=1
        )
    request = pb.GenerateRequest(prompt="Numbers:", max_tokens=1)
    request.response_format.type = "json_schema"
    request.response_format.json_schema.update(
        {
            "type": "object",
            "properties": {
                f"n{i}": {"type": "number", "minimum": -1e15 + rng.random(), "maximum": 1e15 - i}
                for i in range(300)
            },
        }
    )
    return request


if __name__ == "__main__":
    raise SystemExit(main())
