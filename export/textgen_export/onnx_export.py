"""Checkpoint folder → servable model directory: model.onnx, tokenizer.json, textgen.json.

The directory appears only when complete: everything is written into a hidden staging folder
beside it and renamed into place at the end, so a failed export never leaves a directory that
looks like a model.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from textgen_server.model_config import (
    CONFIG_FILE,
    KV_JOIN_FILE,
    KV_SELECT_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    ModelConfig,
)

from .checkpoint import Architecture, read_architecture
from .errors import ExportError
from .kv_graphs import write_kv_graphs
from .native_graph import DecoderShape, build_decoder_graph, save_decoder
from .progress import Progress
from .tokenizer import checkpoint_tokenizer

log = logging.getLogger(__name__)

TASK = "text-generation-with-past"
DTYPES = ("fp32", "fp16")
DEVICES = ("cpu", "cuda")
CHECKPOINT_DIR = "checkpoint"
GRAPHS = ("native", "optimum")


def export_checkpoint(
    checkpoint: Path,
    out: Path,
    *,
    dtype: str = "fp32",
    device: str = "cpu",
    name: str | None = None,
    source: str | None = None,
    overwrite: bool = False,
    bundle_checkpoint: bool = False,
    graph: str = "native",
) -> ModelConfig:
    """Export a local Mistral/Llama checkpoint folder into the model directory `out`.

    `graph` picks how: "native" writes textgen's compact decoder graph from the weights
    (native_graph.py; faster to serve), "optimum" traces the model with optimum's exporter. Both
    have the same inputs and outputs and pass the same parity tests.
    With `bundle_checkpoint`, a copy of the checkpoint goes to `out/checkpoint/` (demo models keep
    theirs so that tests can compare with transformers on the same weights).
    """
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if device not in DEVICES:
        raise ExportError(f"--device {device}: expected one of {', '.join(DEVICES)}")
    if graph not in GRAPHS:
        raise ExportError(f"--graph {graph}: expected one of {', '.join(GRAPHS)}")
    if graph == "optimum" and dtype == "fp16" and device != "cuda":
        raise ExportError(
            "--graph optimum --dtype fp16 needs --device cuda (optimum traces fp16 on a GPU only)"
        )
    arch = read_architecture(checkpoint)
    staging = _make_staging_dir(out, overwrite)
    progress = Progress(total_steps=4)
    try:
        with progress.step("writing tokenizer.json"):
            try:
                checkpoint_tokenizer(checkpoint, staging / TOKENIZER_FILE)
            except ValueError as exc:  # no tokenizer, or one SentencePiece parity cannot be kept for
                raise ExportError(str(exc)) from exc
        if graph == "optimum":
            with progress.step(
                f"exporting {checkpoint} to ONNX with optimum ({dtype} on {device}; a 7B model takes many minutes)"
            ):
                _optimum_export(checkpoint, staging / "optimum", dtype=dtype, device=device)
            with progress.step("keeping only the last position's logits"):
                _finish_graph(staging / "optimum", staging)
        else:
            with progress.step(f"loading {checkpoint} ({dtype}; a 7B model takes a few minutes)"):
                shape, weights = _load_weights(checkpoint, dtype)
            with progress.step(f"writing the decoder graph ({shape.num_layers} layers)"):
                save_decoder(build_decoder_graph(shape, weights, dtype), staging / MODEL_FILE)
                del weights
        write_kv_graphs(staging, num_layers=arch.num_layers, dtype=dtype)
        with progress.step("writing textgen.json"):
            config = _model_config(
                arch, dtype=dtype, name=name or checkpoint.name, source=source or str(checkpoint)
            )
            config.save(staging)
        if bundle_checkpoint:
            shutil.copytree(checkpoint, staging / CHECKPOINT_DIR)
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("model directory ready: %s", out)
    return config


def _make_staging_dir(out: Path, overwrite: bool) -> Path:
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"--out {out}: exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise ExportError(f"--out {out}: directory is not empty (use --overwrite to replace it)")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    except OSError as exc:
        raise ExportError(f"--out {out}: cannot write there ({exc.strerror or exc})") from exc


def _optimum_export(checkpoint: Path, optimum_dir: Path, *, dtype: str, device: str) -> None:
    import warnings

    from optimum.exporters.onnx import main_export
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # optimum passes transformers a deprecated argument on every export

    # Validation would run the 7B model twice more; parity is proven by the test suite instead.
    # no_post_process: keep one graph that serves prefill (past length 0) and decode alike.
    with warnings.catch_warnings():
        # torch.jit tracer notes about shape-dependent Python branches: optimum's model patcher
        # handles them, and the parity tests prove the graph; they only bury the progress lines.
        warnings.simplefilter("ignore")
        main_export(
            str(checkpoint),
            optimum_dir,
            task=TASK,
            device=device,
            dtype=dtype,
            do_validation=False,
            no_post_process=True,
            local_files_only=True,
        )


def _load_weights(checkpoint: Path, dtype: str) -> tuple[DecoderShape, dict[str, Any]]:
    """The checkpoint's tensors as numpy arrays in `dtype` (bf16 checkpoints are converted)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch_dtype, local_files_only=True)
    # Positions the server can reach: max_total_tokens, bounded by what the model was trained for.
    positions = min(int(getattr(model.config, "max_position_embeddings", 32768)), 32768)
    shape = DecoderShape.from_hf_config(model.config, max_positions=positions)
    weights = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}
    if "lm_head.weight" not in weights:  # tied embeddings
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return shape, weights


def _finish_graph(optimum_dir: Path, staging: Path) -> None:
    """Slice the hidden states to the last position before the LM head.

    The engine samples from the last position only: this skips the [seq, hidden] x [hidden, vocab]
    product for every prompt token and makes `logits` [batch, 1, vocab].
    """
    import onnx
    from onnx import TensorProto, helper

    graph_path = optimum_dir / MODEL_FILE
    model = onnx.load(str(graph_path), load_external_data=False)
    graph = model.graph
    producers = [n for n in graph.node if "logits" in n.output]
    if len(producers) != 1 or producers[0].op_type != "MatMul":
        raise ExportError(f"unexpected graph: 'logits' is not produced by one MatMul ({producers})")
    lm_head = producers[0]
    hidden = lm_head.input[0]
    consts = {
        "textgen_last_start": -1,
        "textgen_last_end": 2**63 - 1,
        "textgen_last_axis": 1,
    }
    for const_name, value in consts.items():
        graph.initializer.append(helper.make_tensor(const_name, TensorProto.INT64, [1], [value]))
    sliced = "textgen/last_position_hidden"  # [batch, 1, hidden]
    slice_node = helper.make_node("Slice", [hidden, *consts], [sliced], name="textgen/last_position")
    lm_head.input[0] = sliced
    index = list(graph.node).index(lm_head)
    graph.node.insert(index, slice_node)
    for output in graph.output:
        if output.name == "logits":
            output.type.tensor_type.shape.dim[1].ClearField("dim_param")
            output.type.tensor_type.shape.dim[1].dim_value = 1
    # Weights stay where optimum put them (external data for >2 GB); only the graph is rewritten.
    onnx.save(model, str(staging / MODEL_FILE))
    for data_file in optimum_dir.iterdir():
        if data_file.name != MODEL_FILE and not data_file.name.endswith(".json"):
            os.replace(data_file, staging / data_file.name)
    shutil.rmtree(optimum_dir)


def _model_config(arch: Architecture, *, dtype: str, name: str, source: str) -> ModelConfig:
    return ModelConfig(
        name=name,
        dtype=dtype,
        num_layers=arch.num_layers,
        num_kv_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
        vocab_size=arch.vocab_size,
        bos_token_id=arch.bos_token_id,
        eos_token_id=arch.eos_token_id,
        source=source,
    )


def _publish(staging: Path, out: Path) -> None:
    missing = [
        f
        for f in (MODEL_FILE, TOKENIZER_FILE, CONFIG_FILE, KV_JOIN_FILE, KV_SELECT_FILE)
        if not (staging / f).is_file()
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
