"""Prefix caching, measured: the same multi-turn chats against this server with the cache and without.

    python -m bench.prefix [--conversations 4] [--turns 6] [--words 80] [--new 48] [--rounds 3]

Two servers on the bench model in this process (`--prefix-cache` on and off), used one at a time. A
round plays `--conversations` chats at once, `--turns` turns each. Every turn sends the whole
conversation so far through the `chat` input, as chat clients do: the earlier user messages (of
`--words` random words each), the answers, and a new user message. The cached server's greedy answers
become the history both servers get next, so the two see the same requests; within each turn both
servers take the turn back to back, who goes first alternating. Each round draws new messages, so a
round finds nothing of the one before in the cache.

Reported per turn: the median time to first token of each server (the prefill of the conversation so
far, which is what the cache saves) and their ratio, and for the whole run the prompt tokens each
server ran through a forward pass (`textgen_prefill_tokens`) and took from the cache
(`textgen_prefix_cache_tokens`). Written to bench/results/prefix.json. Uses models/bench (made on first
use, as `make bench` makes it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

from textgen.v1 import textgen_pb2 as pb
from textgen.v1 import textgen_pb2_grpc as rpc

from .grpc_load import GrpcPeer
from .machine import machine_info
from .prompts import vocabulary_words, words_prompt
from .run import ensure_bench_model
from .stats import ratio

REPO = Path(__file__).resolve().parent.parent
RESULT = REPO / "bench" / "results" / "prefix.json"
SERVERS = ("cache", "no cache")

Messages = list[tuple[str, str]]  # (role, content)


async def _turn(peer: GrpcPeer, messages: Messages, new_tokens: int) -> dict[str, Any]:
    """One request of a chat: its time to first token, end, answer text and prompt tokens."""
    stub = rpc.TextGenerationStub(peer.channel)
    chat = pb.Chat(messages=[pb.Message(role=role, content=content) for role, content in messages])
    request = pb.GenerateRequest(chat=chat, max_tokens=new_tokens, temperature=0)
    sent = time.perf_counter()
    first: float | None = None
    text: list[str] = []
    prompt_tokens = 0
    # The generated stubs are typed for the sync API; on an aio channel the call is async-iterable.
    async for message in stub.GenerateStream(request):  # type: ignore[attr-defined]
        if first is None and message.HasField("token"):
            first = time.perf_counter()
        text.append(message.response)
        if message.HasField("usage"):
            prompt_tokens = message.usage.prompt_tokens
    ended = time.perf_counter()
    return {
        "ttft_s": (first or ended) - sent,
        "total_s": ended - sent,
        "answer": "".join(text),
        "prompt_tokens": prompt_tokens,
    }


def _turn_all(peer: GrpcPeer, chats: list[Messages], new_tokens: int) -> list[dict[str, Any]]:
    async def together() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(_turn(peer, chat, new_tokens) for chat in chats)))

    return peer.loop.run_until_complete(together())


def _counter(peer: GrpcPeer, name: str) -> float:
    value = peer.server.metrics.registry.get_sample_value(name)
    return float(value or 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--conversations", type=int, default=4, help="chats played at once")
    parser.add_argument("--turns", type=int, default=6, help="user turns per chat")
    parser.add_argument("--words", type=int, default=80, help="random words per user message")
    parser.add_argument("--new", type=int, default=48, help="max_tokens of each answer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if min(args.conversations, args.turns, args.words, args.new, args.rounds, args.threads) < 1:
        parser.error("every option must be at least 1")
    model_dir = ensure_bench_model(REPO)
    words = vocabulary_words(model_dir / "tokenizer.json")
    peers = {name: GrpcPeer(str(model_dir), args.threads, prefix_cache=name == "cache") for name in SERVERS}
    ttft: dict[str, list[list[float]]] = {name: [[] for _ in range(args.turns)] for name in SERVERS}
    prompt_tokens: list[list[int]] = [[] for _ in range(args.turns)]
    wall = {name: 0.0 for name in SERVERS}
    try:
        for round_ in range(args.rounds):
            rng = random.Random(round_)
            chats: list[Messages] = [[] for _ in range(args.conversations)]
            for turn in range(args.turns):
                for chat in chats:
                    chat.append(("user", words_prompt(args.words, rng, words)))
                order = SERVERS if (round_ + turn) % 2 == 0 else SERVERS[::-1]
                results: dict[str, list[dict[str, Any]]] = {}
                for name in order:
                    started = time.perf_counter()
                    results[name] = _turn_all(peers[name], chats, args.new)
                    wall[name] += time.perf_counter() - started
                    ttft[name][turn] += [r["ttft_s"] for r in results[name]]
                prompt_tokens[turn] += [r["prompt_tokens"] for r in results["cache"]]
                for chat, result in zip(chats, results["cache"], strict=True):
                    chat.append(("assistant", result["answer"].strip() or "ok"))
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
        counters = {
            name: {
                "prefilled_tokens": _counter(peer, "textgen_prefill_tokens_total"),
                "prefix_cache_tokens": _counter(peer, "textgen_prefix_cache_tokens_total"),
            }
            for name, peer in peers.items()
        }
    finally:
        for peer in peers.values():
            peer.close()
    turns = [
        {
            "turn": turn + 1,
            "prompt_tokens_median": statistics.median(prompt_tokens[turn]),
            "ttft_ms_cache": 1e3 * statistics.median(ttft["cache"][turn]),
            "ttft_ms_no_cache": 1e3 * statistics.median(ttft["no cache"][turn]),
            "ttft_no_cache_over_cache": ratio(
                statistics.median(ttft["no cache"][turn]), statistics.median(ttft["cache"][turn])
            ),
        }
        for turn in range(args.turns)
    ]
    report = {
        "settings": vars(args),
        "machine": machine_info(args.threads),
        "turns": turns,
        "wall_s": wall,
        "wall_no_cache_over_cache": ratio(wall["no cache"], wall["cache"]),
        "counters": counters,
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(report, indent=2) + "\n")
    print("| turn | prompt tokens (median) | TTFT with cache (ms) | TTFT without (ms) | without ÷ with |")
    print("|---|---|---|---|---|")
    for t in turns:
        print(
            f"| {t['turn']} | {t['prompt_tokens_median']:.0f} | {t['ttft_ms_cache']:.1f} | "
            f"{t['ttft_ms_no_cache']:.1f} | {t['ttft_no_cache_over_cache']:.2f}× |"
        )
    print(
        f"whole chats: {wall['cache']:.1f} s with the cache, {wall['no cache']:.1f} s without "
        f"({report['wall_no_cache_over_cache']:.2f}×); prompt tokens prefilled: "
        f"{counters['cache']['prefilled_tokens']:.0f} with (and {counters['cache']['prefix_cache_tokens']:.0f} "
        f"from the cache), {counters['no cache']['prefilled_tokens']:.0f} without; written to {RESULT}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
