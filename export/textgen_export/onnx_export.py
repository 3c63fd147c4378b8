"""Checkpoint folder → servable model directory: model.onnx, tokenizer.json, textgen.json.

The directory appears only when complete: everything is written into a hidden staging folder
beside it and renamed into place at the end, so a failed export never leaves a directory that
looks like a model.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from textgen_server.model_config import (
    ACTIVATION_DTYPES,
    CARD_MAX_INPUT_LENGTH,
    CARD_MAX_TOTAL_TOKENS,
    CONFIG_FILE,
    DEFAULT_LORA_RANK,
    FORMAT_VERSION,
    KV_COPY_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    WEIGHT_DTYPES,
    LoraLayout,
    ModelConfig,
)
from textgen_server.tokenizer import Tokenizer as ServedTokenizer

from .checkpoint import Architecture, read_architecture
from .checkpoint_tensors import CheckpointTensors, has_safetensors
from .errors import ExportError, missing_tensors
from .kv_graphs import write_kv_copy_graph
from .native_graph import (
    EXTERNAL_DATA_OVER,
    DecoderShape,
    WeightBits,
    build_decoder_graph,
    lora_layout,
    save_decoder,
)
from .progress import Progress, StepStatus
from .quantize import BITS, DEFAULT_LM_HEAD, measure_quality, quantization_settings
from .tokenizer import checkpoint_tokenizer

log = logging.getLogger(__name__)

DTYPES = WEIGHT_DTYPES
CHECKPOINT_DIR = "checkpoint"


def export_checkpoint(
    checkpoint: Path,
    out: Path,
    *,
    dtype: str = "fp32",
    activations: str | None = None,
    name: str | None = None,
    source: str | None = None,
    overwrite: bool = False,
    bundle_checkpoint: bool = False,
    weights: tuple[DecoderShape, dict[str, Any]] | None = None,
    lora_slots: int = 0,
    lora_rank: int = DEFAULT_LORA_RANK,
    lm_head: str | None = None,
    external_data_over: int = EXTERNAL_DATA_OVER,
    quality_check: bool = True,
) -> ModelConfig:
    """Export a local Mistral/Llama checkpoint folder into the model directory `out`.

    The decoder graph is written op by op from the weights (native_graph.py), with the KV-slot copy
    graph beside it (kv_graphs.py). `dtype` is the weights' dtype; `activations` the activations' and
    the KV cache's (default: fp16 for fp16 weights, else fp32). int4/int8 weights are quantized to
    MatMulNBits as they are written; with `quality_check` the export also writes the unquantized
    graph and reports the quantized one's agreement with it (quantize.py; running the unquantized
    graph takes its size in memory: 29 GB for Mistral-7B in fp32). `lm_head` is the LM head's dtype
    then ("int8" by default, or "int4").
    With `bundle_checkpoint`, a copy of the checkpoint goes to `out/checkpoint/` (demo models keep
    theirs so that tests can compare with transformers on the same weights).
    `weights`: the checkpoint's shape and tensors already in memory (the demo draws them with
    numpy), so that neither torch nor transformers is needed to load them. Otherwise a safetensors
    checkpoint is read a tensor at a time (checkpoint_tensors.py), and when its weights come to more
    than `external_data_over` bytes they are written to `model.onnx_data` as the graph is built: the
    export then holds about one layer's weights at a time.
    `lora_slots` adapters of rank up to `lora_rank` can be resident at once (0: a graph without
    adapter slots, exactly as before; native_graph.py says how the slots work).
    """
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    activations = activations or ("fp16" if dtype == "fp16" else "fp32")
    if activations not in ACTIVATION_DTYPES or (dtype in ACTIVATION_DTYPES and activations != dtype):
        raise ExportError(
            f"--activations {activations}: expected {' or '.join(ACTIVATION_DTYPES)}, and the same as "
            f"--dtype for fp32/fp16 weights (got --dtype {dtype})"
        )
    if lora_slots < 0 or (lora_slots and lora_rank < 1):
        raise ExportError(
            f"--lora-slots {lora_slots} --lora-rank {lora_rank}: slots must be 0 or more and rank 1 or more"
        )
    quantized = dtype in BITS
    if lm_head is not None and not (quantized and lm_head in BITS):
        raise ExportError(
            f"--lm-head {lm_head}: expected {' or '.join(BITS)}, with --dtype {' or '.join(BITS)} "
            f"(got --dtype {dtype}; fp32/fp16 weights keep the LM head in their dtype)"
        )
    lm_head = lm_head or DEFAULT_LM_HEAD
    arch = read_architecture(checkpoint)
    staging = _make_staging_dir(out, overwrite, checkpoint)
    # Only a checkpoint without safetensors is loaded whole, as a step of its own.
    loads_whole = weights is None and not has_safetensors(checkpoint)
    measured = quantized and quality_check
    progress = Progress(total_steps=3 + 2 * measured + loads_whole)
    try:
        tensors: Mapping[str, Any]
        if weights is not None:
            shape, tensors = weights
        elif not loads_whole:  # headers only: a broken or partial download fails before any work
            shape, tensors = _checkpoint_tensors(checkpoint, activations)
        with progress.step("writing tokenizer.json"):
            try:
                checkpoint_tokenizer(checkpoint, staging / TOKENIZER_FILE)
            except ValueError as exc:  # no tokenizer, or one SentencePiece parity cannot be kept for
                raise ExportError(str(exc)) from exc
            _check_served_tokenizer(staging / TOKENIZER_FILE, arch)
        if loads_whole:
            with progress.step(f"loading {checkpoint} ({activations}; a 7B model takes a few minutes)"):
                shape, tensors = _load_weights(checkpoint, activations)
        streamed = _weight_bytes(tensors) > external_data_over
        lora = lora_layout(shape, lora_slots, lora_rank) if lora_slots else None

        def write_graph(directory: Path, bits: WeightBits | None, status: StepStatus) -> None:
            data_file = directory / f"{MODEL_FILE}_data" if streamed else None

            def layer_written(done: int) -> None:
                status.detail = f"{done} of {shape.num_layers} layers written"

            decoder = build_decoder_graph(
                shape,
                tensors,
                activations,
                lora=lora,
                external_data=data_file,
                bits=bits,
                on_layer=layer_written,
            )
            status.detail = "saving"
            save_decoder(decoder, directory / MODEL_FILE)

        where = f", weights to {MODEL_FILE}_data as they are read" if streamed else ""
        # The unquantized graph, to measure the quantized one against; removed once measured.
        reference = staging / ".unquantized"
        if measured:
            with progress.step(
                f"writing the unquantized decoder graph to measure against ({activations}{where})"
            ) as status:
                reference.mkdir()
                write_graph(reference, None, status)
        bits = WeightBits(BITS[dtype], BITS[lm_head]) if quantized else None
        what = f", quantized to {dtype} with the LM head in {lm_head} (MatMulNBits)" if quantized else ""
        with progress.step(f"writing the decoder graph ({shape.num_layers} layers{what}{where})") as status:
            write_graph(staging, bits, status)
        write_kv_copy_graph(staging, num_layers=arch.num_layers, dtype=activations)
        config = _model_config(
            arch,
            max_positions=shape.max_positions,
            dtype=activations,
            weight_dtype=dtype,
            name=name or checkpoint.name,
            source=source or str(checkpoint),
            lora=lora,
        )
        if measured:
            with progress.step("measuring the quantized model against the unquantized one"):
                for name_ in (TOKENIZER_FILE, KV_COPY_FILE):
                    shutil.copyfile(staging / name_, reference / name_)
                config.save(reference)
                config.save(staging)  # rewritten below with the report
                report = measure_quality(reference, staging)
                shutil.rmtree(reference)
            log.info(
                "%s: next-token agreement with the unquantized model %.1f%%, mean KL %.4f nats "
                "(%d positions of a fixed text)",
                dtype,
                100 * report.next_token_agreement,
                report.mean_kl,
                report.positions,
            )
            settings = quantization_settings(dtype, lm_head) | report.as_dict()
            config = dataclasses.replace(config, quantization=settings)
        elif quantized:
            log.info("%s: quality not measured (--no-quality-check)", dtype)
            config = dataclasses.replace(config, quantization=quantization_settings(dtype, lm_head))
        with progress.step("writing textgen.json"):
            config.save(staging)
        if bundle_checkpoint:
            shutil.copytree(checkpoint, staging / CHECKPOINT_DIR)
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("model directory ready: %s", out)
    return config


def _check_served_tokenizer(path: Path, arch: Architecture) -> None:
    """The tokenizer as the server will load it: refused here rather than when the server starts."""
    try:
        tokenizer = ServedTokenizer.from_file(path)
    except ValueError as exc:  # its cause without the path: the staging folder's means nothing to the user
        reason = exc.__cause__ if exc.__cause__ is not None else exc
        raise ExportError(f"the checkpoint's tokenizer cannot be served: {reason}") from exc
    if tokenizer.vocab_size > arch.vocab_size:
        raise ExportError(
            f"the checkpoint's tokenizer has {tokenizer.vocab_size} tokens, more than config.json's "
            f"vocab_size {arch.vocab_size}"
        )


def _make_staging_dir(out: Path, overwrite: bool, checkpoint: Path) -> Path:
    target = out.resolve()
    if Path.cwd().resolve().is_relative_to(target):
        # "", "." or ".." (an unset $DIR, say): replacing it would delete the folder this runs in.
        raise ExportError(
            f"--out {str(out) or repr('')}: is {target}, the working directory or a folder holding it; "
            "choose a folder of its own"
        )
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"--out {out}: exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise ExportError(f"--out {out}: directory is not empty (use --overwrite to replace it)")
        if checkpoint.resolve().is_relative_to(out.resolve()):  # --overwrite would delete it
            raise ExportError(f"--out {out}: holds the checkpoint being exported; choose another --out")
    parent = target.parent  # beside what it replaces: "a/.." has no name of its own to stage under
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=parent))
    except OSError as exc:
        raise ExportError(f"--out {out}: cannot write there ({exc.strerror or exc})") from exc


def _checkpoint_tensors(checkpoint: Path, dtype: str) -> tuple[DecoderShape, CheckpointTensors]:
    """The checkpoint's shape, and its tensors to be read one at a time in `dtype`."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(checkpoint), local_files_only=True)
    shape = DecoderShape.from_hf_config(config, max_positions=_max_positions(config))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return shape, CheckpointTensors(checkpoint, dtype, tie_word_embeddings=tied)


def _weight_bytes(tensors: Mapping[str, Any]) -> int:
    if isinstance(tensors, CheckpointTensors):
        return tensors.nbytes()
    return sum(int(array.nbytes) for array in tensors.values())


def _max_positions(config: Any) -> int:
    """Positions the server can reach: max_total_tokens, bounded by what the model was trained for."""
    return min(int(getattr(config, "max_position_embeddings", 32768)), 32768)


def _load_weights(checkpoint: Path, dtype: str) -> tuple[DecoderShape, dict[str, Any]]:
    """A checkpoint without safetensors (pytorch .bin files) through transformers: every tensor in
    memory at once, as numpy arrays in `dtype` (bf16 checkpoints are converted)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    # With output_loading_info, a (model, loading info) pair; its stubs know only the model.
    loaded: tuple[Any, dict[str, list[str]]] = AutoModelForCausalLM.from_pretrained(  # type: ignore[assignment]
        str(checkpoint), dtype=torch_dtype, local_files_only=True, output_loading_info=True
    )
    model, loading = loaded
    # transformers starts what the files lack from random values: an incomplete checkpoint would
    # export as a model that answers noise.
    if loading["missing_keys"]:
        raise missing_tensors(sorted(loading["missing_keys"]))
    shape = DecoderShape.from_hf_config(model.config, max_positions=_max_positions(model.config))
    weights = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}
    if "lm_head.weight" not in weights:  # tied embeddings
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return shape, weights


def _model_config(
    arch: Architecture,
    *,
    max_positions: int,
    dtype: str,
    weight_dtype: str,
    name: str,
    source: str,
    lora: LoraLayout | None,
) -> ModelConfig:
    """The model's textgen.json. Its limits are the card's, lowered for a model trained on fewer
    positions (max_position_embeddings 2048: the graph's rotary table has no row past it)."""
    max_total = min(CARD_MAX_TOTAL_TOKENS, max_positions)
    return ModelConfig(
        name=name,
        max_input_length=min(CARD_MAX_INPUT_LENGTH, max_total - 1),
        max_total_tokens=max_total,
        dtype=dtype,
        weight_dtype=weight_dtype,
        num_layers=arch.num_layers,
        num_kv_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
        vocab_size=arch.vocab_size,
        bos_token_id=arch.bos_token_id,
        eos_token_id=arch.eos_token_id,
        source=source,
        format_version=FORMAT_VERSION,
        lora=lora,
    )


def _publish(staging: Path, out: Path) -> None:
    missing = [
        f for f in (MODEL_FILE, TOKENIZER_FILE, CONFIG_FILE, KV_COPY_FILE) if not (staging / f).is_file()
    ]
    if missing:
        raise ExportError(f"export incomplete: {', '.join(missing)} not written")
    # mkdtemp and atomic writes create owner-only files; a model directory is for everyone to read.
    staging.chmod(0o755)
    for path in staging.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
