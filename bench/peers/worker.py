"""A peer in its own process, driven over JSON lines on stdin/stdout.

One process per peer: torch's OpenMP pool and ORT's pool each spin for a while after a run, and in one
process they would steal cores from each other; separate processes also let onnxruntime-genai run
from its own virtualenv. Requests: `{"op": NAME, ...args}`; replies: `{"ok": result}` or
`{"error": text}`. The first line out is `{"ready": info}` once the model is loaded.

    python -m bench.peers.worker --peer engine --model-dir models/bench --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Any, Protocol, TextIO


class Peer(Protocol):
    def info(self) -> dict[str, Any]: ...


PEERS = ("engine", "transformers", "genai", "grpc")


def load_peer(
    name: str, model_dir: str, threads: int, provider: str = "cpu", lora_dir: str | None = None
) -> Peer:
    # Imported by name: each virtualenv has only its own peer's libraries.
    if name == "engine":
        from .engine_peer import EnginePeer

        return EnginePeer(model_dir, threads, provider)
    if name == "transformers":
        from .transformers_peer import TransformersPeer

        return TransformersPeer(model_dir, threads)
    if name == "genai":
        from .genai_peer import GenaiPeer

        return GenaiPeer(model_dir, threads)
    if name == "grpc":
        from ..grpc_load import GrpcPeer

        return GrpcPeer(model_dir, threads, lora_dir)
    raise ValueError(f"unknown peer {name!r}; expected one of {', '.join(PEERS)}")


def serve(peer: Peer, requests: TextIO, replies: TextIO) -> None:
    _send(replies, {"ready": peer.info()})
    for line in requests:
        if not line.strip():
            continue
        request = json.loads(line)
        op = request.pop("op")
        if op == "quit":
            return
        try:
            _send(replies, {"ok": getattr(peer, op)(**request)})
        except Exception:  # noqa: BLE001 - reported to the orchestrator, which records the peer as failed
            _send(replies, {"error": traceback.format_exc()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.worker")
    parser.add_argument("--peer", choices=PEERS, required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="the engine's only")
    parser.add_argument("--lora-dir", default=None, help="the grpc peer's only: the server's --lora-dir")
    args = parser.parse_args(argv)
    # Keep the protocol on a private copy of stdout; library prints (progress bars, warnings) go to stderr.
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    try:
        peer = load_peer(args.peer, args.model_dir, args.threads, args.provider, args.lora_dir)
    except Exception:  # noqa: BLE001 - any load failure goes to the orchestrator as text
        _send(replies, {"error": traceback.format_exc()})
        return 1
    serve(peer, sys.stdin, replies)
    return 0


def _send(out: TextIO, message: dict[str, Any]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


if __name__ == "__main__":
    sys.exit(main())
