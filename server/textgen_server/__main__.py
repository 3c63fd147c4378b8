"""`textgen-server --model-dir DIR [--host] [--port 50051] [--tls-cert --tls-key] [--auth-token-file]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from .app import MAX_MESSAGE_BYTES, STREAMS_BESIDE_REQUESTS, ServerSettings, StartupError, TextgenServer
from .model_config import CONFIG_FILE
from .scheduler import SchedulerLimits
from .tls import TlsFiles

log = logging.getLogger("textgen_server")

INT32_MAX = 2**31 - 1  # grpc's channel options are C ints: larger values raised OverflowError
MAX_THREADS = 1024  # --threads 1,000,000 started threads until the kernel killed the process


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in --help, except where there is none to show (None, a flag) or the
    help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None) -> ServerSettings:
    parser = argparse.ArgumentParser(
        prog="textgen-server",
        description="Serve a textgen model directory over gRPC",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--model-dir", type=Path, required=True, help="directory written by textgen-export")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port (0 picks a free one)")
    parser.add_argument(
        "--provider",
        choices=["auto", "cuda", "cpu"],
        default="auto",
        help="execution provider; auto uses CUDA where onnxruntime-gpu finds a GPU",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads per forward pass (default: ONNX Runtime's)"
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=32, help="sequences decoded together (KV slots)"
    )
    parser.add_argument(
        "--max-batch-prefill-tokens",
        type=int,
        default=8192,
        help="prompt tokens prefilled per step when nothing is decoding (on the CPU in passes no longer "
        "than a prefill chunk)",
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
        help="open requests (running, queued, or still sending their output); more get RESOURCE_EXHAUSTED",
    )
    parser.add_argument(
        "--prefill-chunk-tokens",
        type=int,
        default=512,
        help="prompt tokens prefilled per step while streams decode (a long prompt goes in chunks); on the "
        "CPU also the most one forward pass takes",
    )
    parser.add_argument(
        "--prefix-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="free KV slots keep the positions of finished sequences, and a prompt that starts with "
        "the same tokens (a chat's next turn, a shared system prompt) prefills only the rest",
    )
    parser.add_argument(
        "--huge-pages",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on the CPU, move the loaded weights into 2 MiB pages (Linux 6.1+): decode runs 4-10%% "
        "faster, start-up takes about 1-3 s a GiB of weights longer (next to nothing where "
        "GLIBC_TUNABLES=glibc.malloc.hugetlb=1 put them there as they loaded)",
    )
    parser.add_argument(
        "--validation-workers",
        type=int,
        default=2,
        help="threads that validate requests, tokenize them and compile their grammars, off the event "
        "loop (text-generation-inference's option of the same name); more requests wait for one",
    )
    parser.add_argument(
        "--model-name", default=None, help="name reported by GetModelInfo (default: the model's own)"
    )
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=MAX_MESSAGE_BYTES,
        help="largest request or response message; larger ones are refused RESOURCE_EXHAUSTED",
    )
    parser.add_argument(
        "--grace", type=float, default=30.0, help="seconds to drain in-flight requests on shutdown"
    )
    metrics = parser.add_argument_group("metrics")
    metrics.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port (default: off)"
    )
    metrics.add_argument(
        "--metrics-host", default=None, help="address of the metrics port (default: the --host value)"
    )
    security = parser.add_argument_group("security (default: plaintext, no authentication)")
    security.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain: serve TLS")
    security.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    security.add_argument(
        "--tls-client-ca",
        type=Path,
        default=None,
        help="PEM CA bundle: require client certificates it signed (mutual TLS)",
    )
    security.add_argument(
        "--auth-token-file",
        type=Path,
        default=None,
        help="accepted bearer tokens, one per line, re-read on SIGHUP; calls need "
        "'authorization: Bearer <token>' (health checks excepted)",
    )
    security.add_argument(
        "--reflection-public",
        action="store_true",
        help="serve reflection without a token (by default it needs one like the API)",
    )
    parser.add_argument(
        "--lora-dir",
        type=Path,
        default=None,
        help="serve every NAME.npz in this directory (textgen-export lora) as LoRA adapter NAME; "
        "SIGHUP rescans it",
    )
    args = parser.parse_args(argv)
    if not (args.model_dir / CONFIG_FILE).is_file():
        # One line, without argparse's usage block: the arguments were right, the directory is not.
        parser.exit(
            2,
            f"{parser.prog}: error: --model-dir {args.model_dir}: not a model directory (no {CONFIG_FILE}); "
            "make one with `textgen-export demo --out DIR`\n",
        )
    if args.lora_dir is not None and not args.lora_dir.is_dir():
        parser.error(f"--lora-dir {args.lora_dir}: not a directory")
    for name in (
        "max_batch_size",
        "max_batch_prefill_tokens",
        "max_batch_total_tokens",
        "max_concurrent_requests",
        "prefill_chunk_tokens",
        "validation_workers",
    ):
        if not 1 <= getattr(args, name) <= INT32_MAX - STREAMS_BESIDE_REQUESTS:
            parser.error(
                f"--{name.replace('_', '-')} must be 1 to {INT32_MAX - STREAMS_BESIDE_REQUESTS}, "
                f"got {getattr(args, name)}"
            )
    for name in ("port", "metrics_port"):  # grpc took 70000 for 70000 % 65536 and served there
        port = getattr(args, name)
        if port is not None and not 0 <= port <= 65535:
            parser.error(f"--{name.replace('_', '-')} must be 0 to 65535, got {port}")
    if args.threads is not None and not 0 <= args.threads <= MAX_THREADS:
        parser.error(f"--threads must be 0 (one per physical core) to {MAX_THREADS}, got {args.threads}")
    if args.prefill_chunk_tokens > args.max_batch_prefill_tokens:
        parser.error(
            f"--prefill-chunk-tokens {args.prefill_chunk_tokens} must not exceed --max-batch-prefill-tokens "
            f"{args.max_batch_prefill_tokens}: a step beside running streams would prefill more than an "
            "idle one"
        )
    if args.grace < 0:
        parser.error(f"--grace must be 0 or more seconds, got {args.grace:g}")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
    if args.reflection_public and args.auth_token_file is None:
        parser.error("--reflection-public only matters with --auth-token-file")
    if not 1024 <= args.max_message_bytes <= INT32_MAX:
        parser.error(f"--max-message-bytes must be 1024 to {INT32_MAX}, got {args.max_message_bytes}")
    tls = None if args.tls_cert is None else TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca)
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
        metrics_host=args.metrics_host,
        grace_seconds=args.grace,
        tls=tls,
        auth_token_file=args.auth_token_file,
        reflection_public=args.reflection_public,
        max_message_bytes=args.max_message_bytes,
        lora_dir=args.lora_dir,
        prefix_cache=args.prefix_cache,
        huge_pages=args.huge_pages,
        validation_workers=args.validation_workers,
    )


async def serve(settings: ServerSettings) -> int:
    """Serve until SIGINT/SIGTERM (a second one ends the drain at once); returns the process exit code."""
    server = TextgenServer(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_stop_signal() -> None:
        if not stopping.is_set():
            stopping.set()
            return
        log.warning("second stop signal: ending the drain now; the calls still running end UNAVAILABLE")
        server.end_drain()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_stop_signal)
    # SIGHUP: re-read the token file and serve what --lora-dir holds now, without a restart. Handled
    # without either too: its default action would kill the server, in-flight calls and all.
    reloads: set[asyncio.Task[object]] = set()

    def reload() -> None:
        if settings.auth_token_file is None and settings.lora_dir is None:
            log.info("SIGHUP: no --auth-token-file or --lora-dir, nothing to reload")
            return
        if settings.auth_token_file is not None:
            server.reload_tokens()
        task: asyncio.Task[object] = asyncio.ensure_future(server.rescan_adapters())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        port = await server.start()
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    try:
        await server.load_model()
    except Exception as exc:  # noqa: BLE001 -- a broken model directory or provider: one line, then exit
        log.error("cannot load %s: %s: %s", settings.model_dir, type(exc).__name__, exc)
        await server.stop(grace=0)
        return 1
    log.info("ready on %s:%d", settings.host, port)
    await stopping.wait()
    log.info("shutting down: draining for up to %g s", settings.grace_seconds)
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
