"""`textgen-server --model-dir DIR [--host] [--port 50051]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from .app import ServerSettings, TextgenServer
from .scheduler import SchedulerLimits

log = logging.getLogger("textgen_server")


def parse_args(argv: list[str] | None) -> ServerSettings:
    parser = argparse.ArgumentParser(
        prog="textgen-server", description="Serve a textgen model directory over gRPC"
    )
    parser.add_argument("--model-dir", type=Path, required=True, help="directory written by textgen-export")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument(
        "--provider",
        choices=["auto", "cuda", "cpu"],
        default="auto",
        help="execution provider; auto uses CUDA where onnxruntime-gpu finds a GPU",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per forward pass")
    parser.add_argument("--max-batch-size", type=int, default=32, help="sequences decoded together (KV slots)")
    parser.add_argument(
        "--max-batch-prefill-tokens",
        type=int,
        default=8192,
        help="prompt tokens prefilled per step when nothing is decoding",
    )
    parser.add_argument(
        "--max-batch-total-tokens",
        type=int,
        default=65536,
        help="KV cache positions allocated at start-up: slots = this / the model's max_total_tokens, "
        "up to --max-batch-size",
    )
    parser.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=128,
        help="running plus queued requests; more get RESOURCE_EXHAUSTED",
    )
    parser.add_argument(
        "--prefill-chunk-tokens",
        type=int,
        default=512,
        help="prompt tokens prefilled per step while streams decode (a long prompt goes in chunks)",
    )
    parser.add_argument("--model-name", default=None, help="name reported by GetModelInfo")
    parser.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port"
    )
    parser.add_argument(
        "--grace", type=float, default=30.0, help="seconds to drain in-flight requests on shutdown"
    )
    args = parser.parse_args(argv)
    if not (args.model_dir / "textgen.json").is_file():
        parser.error(
            f"--model-dir {args.model_dir}: not a model directory (no textgen.json); "
            "make one with `textgen-export demo --out DIR`"
        )
    for name in (
        "max_batch_size",
        "max_batch_prefill_tokens",
        "max_batch_total_tokens",
        "max_concurrent_requests",
        "prefill_chunk_tokens",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return ServerSettings(
        model_dir=args.model_dir,
        host=args.host,
        port=args.port,
        provider=args.provider,
        threads=args.threads,
        limits=SchedulerLimits(
            args.max_batch_size,
            args.max_batch_prefill_tokens,
            args.max_batch_total_tokens,
            args.max_concurrent_requests,
            args.prefill_chunk_tokens,
        ),
        model_name=args.model_name,
        metrics_port=args.metrics_port,
        grace_seconds=args.grace,
    )


async def serve(settings: ServerSettings) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit code."""
    server = TextgenServer(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    try:
        port = await server.start()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    try:
        await server.load_model()
    except Exception as exc:  # noqa: BLE001 -- a broken model directory or provider: one line, then exit
        log.error("cannot load %s: %s: %s", settings.model_dir, type(exc).__name__, exc)
        await server.stop(grace=0)
        return 1
    log.info("ready on %s:%d", settings.host, port)
    await stopping.wait()
    log.info("shutting down: draining for up to %.0f s", settings.grace_seconds)
    await server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
