"""`textgen-export`: make a servable model directory from a checkpoint, or a demo model."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from textgen_server.model_config import DEFAULT_LORA_RANK

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
    _lm_head_option(model)
    _quality_check_option(model)
    _lora_slot_options(model)
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
    _lm_head_option(demo)
    _quality_check_option(demo)
    _lora_slot_options(demo)
    demo.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    demo.add_argument("--debug", action="store_true", help="show the full traceback when the export fails")

    lora = commands.add_parser(
        "lora",
        help="convert a PEFT LoRA adapter for a model directory (the file textgen-server --lora-dir loads)",
    )
    lora.add_argument(
        "peft_dir", type=Path, help="PEFT adapter folder: adapter_config.json, adapter_model.safetensors"
    )
    lora.add_argument("--base", type=Path, required=True, help="the model directory it will be served with")
    lora.add_argument(
        "--out",
        type=Path,
        required=True,
        help="file to write (.npz added when missing); its name is the adapter's",
    )
    lora.add_argument(
        "--debug", action="store_true", help="show the full traceback when the conversion fails"
    )
    return parser


def _lm_head_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lm-head",
        choices=["int8", "int4"],
        default=None,
        help="the LM head's weights with --dtype int4/int8 (default int8: 4 bits there cost measurable "
        "quality; int4 is smaller and is what onnxruntime-genai's int4 builds use)",
    )


def _quality_check_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-quality-check",
        dest="quality_check",
        action="store_false",
        help="with --dtype int4/int8, skip writing the unquantized graph and measuring the quantized one "
        "against it (that runs the unquantized model: its size in RAM, 29 GB for Mistral-7B in fp32)",
    )


def _lora_slot_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lora-slots",
        type=int,
        default=0,
        metavar="N",
        help="adapters servable at once in one batch (default 0: no LoRA support, the plain graph)",
    )
    parser.add_argument(
        "--lora-rank",
        type=int,
        default=DEFAULT_LORA_RANK,
        metavar="R",
        help=f"the largest adapter rank the slots hold (default {DEFAULT_LORA_RANK}; Workers AI "
        "accepts up to 32: --lora-rank 32 takes those, at twice the adapter work per pass)",
    )


# The extra that installs what each command imports beyond the server's packages. The demo's
# packages are a subset of the export extra's; these modules only the export extra brings.
_COMMAND_EXTRA = {"model": "export", "lora": "export", "demo": "demo"}
_EXPORT_ONLY_MODULES = {"torch", "transformers", "onnx_ir"}


def _extra_providing(command: str, module: str) -> str:
    """The extra to install for `command` when `module` (a dotted name) is missing."""
    return "export" if module.split(".")[0] in _EXPORT_ONLY_MODULES else _COMMAND_EXTRA[command]


class _Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, `docker stop`, Kubernetes), handled as Ctrl-C is: what the export had
    written so far is removed on the way out."""


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
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
                lora_slots=args.lora_slots,
                lora_rank=args.lora_rank,
                lm_head=args.lm_head,
                quality_check=args.quality_check,
            )
        elif args.command == "lora":
            from .lora import convert_peft_adapter

            args.out = convert_peft_adapter(args.peft_dir, args.base, args.out)
        else:
            from .demo import build_demo

            build_demo(
                args.out,
                size=args.size,
                dtype=args.dtype,
                activations=args.activations,
                overwrite=args.overwrite,
                lora_slots=args.lora_slots,
                lora_rank=args.lora_rank,
                lm_head=args.lm_head,
                quality_check=args.quality_check,
            )
    except ExportError as exc:
        print(f"textgen-export: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if args.debug or exc.name is None:
            raise
        # The server images and `make serve` install no exporter packages: say which extra does.
        extra = _extra_providing(args.command, exc.name)
        print(
            f"textgen-export: error: {args.command} needs the Python package {exc.name!r}, which is "
            f"not installed: pip install 'textgen[{extra}]'",
            file=sys.stderr,
        )
        return 1
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
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, _Terminated)
        print(
            f"textgen-export: {'terminated' if terminated else 'interrupted'}; nothing was written",
            file=sys.stderr,
        )
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    print(f"textgen-export: wrote {args.out}", file=sys.stderr)
    return 0
