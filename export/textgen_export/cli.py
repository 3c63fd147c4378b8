"""`textgen-export`: make a servable model directory from a checkpoint, or a demo model."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import ExportError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textgen-export", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    model = commands.add_parser("model", help="export a Mistral/Llama checkpoint (hub id or local folder)")
    model.add_argument(
        "source", help="Hugging Face hub id (e.g. mistralai/Mistral-7B-Instruct-v0.2) or folder"
    )
    model.add_argument("--out", type=Path, required=True, help="model directory to create")
    model.add_argument(
        "--dtype",
        choices=["fp32", "fp16", "int4", "int8"],
        default="fp32",
        help="weights; int4/int8 are MatMulNBits (CPU: int4 or int8; GPU: fp16 or int4)",
    )
    model.add_argument(
        "--activations",
        choices=["fp32", "fp16"],
        default=None,
        help="activations and KV cache (default: fp16 with fp16 weights, else fp32; "
        "use fp16 with int4/int8 for a GPU)",
    )
    model.add_argument("--name", help="model name reported by the server (default: the source)")
    model.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    model.add_argument("--debug", action="store_true", help="show the full traceback when the export fails")

    demo = commands.add_parser("demo", help="random-weight Mistral with the real tokenizer (fixed seed)")
    demo.add_argument("--out", type=Path, required=True, help="model directory to create")
    demo.add_argument("--size", choices=["tiny", "bench", "7b"], default="tiny")
    demo.add_argument(
        "--dtype", choices=["fp32", "fp16", "int4", "int8"], default="fp32", help="as for `model`"
    )
    demo.add_argument("--activations", choices=["fp32", "fp16"], default=None, help="as for `model`")
    demo.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    demo.add_argument("--debug", action="store_true", help="show the full traceback when the export fails")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if args.command == "model":
            from .checkpoint import resolve_source
            from .onnx_export import export_checkpoint

            checkpoint = resolve_source(args.source)
            export_checkpoint(
                checkpoint,
                args.out,
                dtype=args.dtype,
                activations=args.activations,
                name=args.name or args.source,
                overwrite=args.overwrite,
            )
        else:
            from .demo import build_demo

            build_demo(
                args.out,
                size=args.size,
                dtype=args.dtype,
                activations=args.activations,
                overwrite=args.overwrite,
            )
    except ExportError as exc:
        print(f"textgen-export: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # from torch or transformers: corrupt weights, out of memory, ...
        if args.debug:
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"textgen-export: error: export failed: {type(exc).__name__}: {reason} "
            "(--debug shows the traceback)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("textgen-export: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(f"textgen-export: wrote {args.out}", file=sys.stderr)
    return 0
