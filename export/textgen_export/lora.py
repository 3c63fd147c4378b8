"""`textgen-export lora`: a PEFT LoRA adapter → the .npz file a textgen server loads (lora_format.py).

What is accepted follows Workers AI's rules for this model's fine-tunes: a PEFT LoRA folder holding
exactly `adapter_config.json` and `adapter_model.safetensors`; `model_type`, where the config names
one, mistral or llama; every adapted module one the graph has a slot for (q/k/v/o_proj, gate/up/
down_proj), with the base model's shapes and a rank the base model's slots hold. Anything else is
refused with one line that says what and where, before anything is written.

The conversion folds PEFT's scale into B (lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA;
`alpha_pattern` and `rank_pattern` per module) and transposes both matrices to the graph's x @ A @ B
orientation, in the base model's activation dtype.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from textgen_server.lora_format import AdapterFormatError, AdapterWeights, Matrix, check_adapter, save_adapter
from textgen_server.model_config import LORA_MODULES, ModelConfig

from .checkpoint import SUPPORTED_MODEL_TYPES
from .errors import ExportError

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# PEFT's names for a decoder layer's LoRA matrices:
# base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}[.{adapter}].weight
_PEFT_KEY = re.compile(
    r"(?:base_model\.model\.)?(model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+?))\.lora_([AB])(?:\.\w+)?\.weight"
)
_MODULE = re.compile(r"(?:.*\.)?(\w+)\.lora_")  # the module a LoRA tensor adapts


def convert_peft_adapter(peft_dir: Path, base_dir: Path, out: Path) -> Path:
    """Check the PEFT adapter in `peft_dir` against the model directory `base_dir` and write it to
    `out` (".npz" appended when missing). Returns the file written; ExportError says what is wrong."""
    try:
        base = ModelConfig.load(base_dir)
    except FileNotFoundError as exc:
        raise ExportError(f"--base {base_dir}: {exc}") from exc
    if base.lora is None:
        raise ExportError(
            f"--base {base_dir}: the model was exported without adapter slots; export it again with "
            "--lora-slots N (and --lora-rank R)"
        )
    config = read_adapter_config(peft_dir)
    tensors = _read_tensors(peft_dir / WEIGHTS_NAME)
    weights = _to_weights(config, tensors, base, peft_dir)
    try:
        check_adapter(weights, base)
    except AdapterFormatError as exc:
        raise ExportError(f"{peft_dir}: {exc}") from exc
    written = save_adapter(weights, out)
    log.info(
        "adapter: rank %d on %s over %d layers, %.1f MiB -> %s",
        weights.rank,
        ", ".join(weights.modules),
        len({layer for layer, _ in weights.matrices}),
        weights.nbytes / 2**20,
        written,
    )
    return written


def read_adapter_config(peft_dir: Path) -> dict[str, Any]:
    """The adapter's config after the checks that need no weights: names, type, features."""
    if not peft_dir.is_dir():
        raise ExportError(f"{peft_dir}: no such folder (expected a PEFT adapter folder)")
    _check_file_names(peft_dir)
    try:
        config = json.loads((peft_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{peft_dir / CONFIG_NAME}: not readable JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ExportError(f"{peft_dir / CONFIG_NAME}: expected a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"{peft_dir / CONFIG_NAME}: peft_type {config['peft_type']!r}; only LORA adapters")
    model_type = config.get("model_type")
    if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
        raise ExportError(
            f"{peft_dir / CONFIG_NAME}: model_type {model_type!r}; expected "
            f"{' or '.join(SUPPORTED_MODEL_TYPES)} (an adapter trained for this model)"
        )
    unsupported = {
        "use_dora": "DoRA",
        "lora_bias": "LoRA biases",
        "modules_to_save": "fully trained modules (modules_to_save)",
        "target_parameters": "LoRA on parameters (target_parameters)",
        "trainable_token_indices": "trained token embeddings (trainable_token_indices)",
        "layer_replication": "layer replication",
    }
    for key, what in unsupported.items():
        if config.get(key):
            raise ExportError(f"{peft_dir / CONFIG_NAME}: {key} is set; {what} cannot be served")
    if config.get("bias", "none") != "none":
        raise ExportError(
            f"{peft_dir / CONFIG_NAME}: bias {config['bias']!r}; only bias 'none' can be served"
        )
    return config


def _check_file_names(peft_dir: Path) -> None:
    names = sorted(p.name for p in peft_dir.iterdir() if p.is_file())
    for expected in (CONFIG_NAME, WEIGHTS_NAME):
        if expected in names:
            continue
        stem, suffix = expected.split(".", 1)
        near = [
            n
            for n in names
            if n not in (CONFIG_NAME, WEIGHTS_NAME)
            and (n.lower().startswith(stem) or n.endswith(f".{suffix}"))
        ]
        hint = f" (found {', '.join(near[:4])}; the file must be named exactly {expected})" if near else ""
        raise ExportError(f"{peft_dir}: {expected} is missing{hint}")


def _read_tensors(path: Path) -> dict[str, Matrix]:
    """Every tensor of the safetensors file as float32 numpy (bf16 and fp16 converted exactly)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ExportError(f"{path}: not a readable safetensors file ({exc})".splitlines()[0]) from exc
    return {name: t.to(torch.float32).numpy() for name, t in tensors.items()}


def _to_weights(
    config: dict[str, Any], tensors: dict[str, Matrix], base: ModelConfig, peft_dir: Path
) -> AdapterWeights:
    halves: dict[tuple[int, str], dict[str, Matrix]] = {}
    paths: dict[tuple[int, str], str] = {}  # PEFT's module path, which alpha_pattern keys match
    slots = ", ".join(LORA_MODULES)
    for name, tensor in sorted(tensors.items()):
        adapted = _MODULE.match(name)
        if adapted is None:
            continue  # not a LoRA matrix: refused below, once every LoRA module was checked
        match = _PEFT_KEY.fullmatch(name)
        if match is None or match[3] not in LORA_MODULES:
            raise ExportError(
                f"{peft_dir / WEIGHTS_NAME}: target module {adapted[1]!r} has no adapter slot in the graph "
                f"(slots: {slots})"
            )
        module_path, layer, module, half = match[1], int(match[2]), match[3], match[4]
        if tensor.ndim != 2:
            raise ExportError(
                f"{peft_dir / WEIGHTS_NAME}: {name} has shape {list(tensor.shape)}, expected 2-D"
            )
        halves.setdefault((layer, module), {})[half] = tensor
        paths[(layer, module)] = module_path
    others = sorted(name for name in tensors if _MODULE.match(name) is None)
    if others:
        raise ExportError(
            f"{peft_dir / WEIGHTS_NAME}: tensor {others[0][:120]!r} is not a LoRA matrix; only LoRA A/B "
            f"matrices of {slots} can be served"
        )
    if not halves:
        raise ExportError(f"{peft_dir / WEIGHTS_NAME}: no LoRA matrices (lora_A / lora_B weights) in it")
    dtype = np.float16 if base.dtype == "fp16" else np.float32
    matrices: dict[tuple[int, str], tuple[Matrix, Matrix]] = {}
    for (layer, module), pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise ExportError(
                f"{peft_dir / WEIGHTS_NAME}: layer {layer} {module} has lora_{''.join(pair)} only"
            )
        a, b = pair["A"], pair["B"]  # PEFT: A [r, in], B [out, r]
        if a.shape[0] != b.shape[1]:
            raise ExportError(
                f"{peft_dir / WEIGHTS_NAME}: layer {layer} {module}: lora_A {list(a.shape)} and "
                f"lora_B {list(b.shape)} disagree on the rank"
            )
        scale = _scale(config, paths[(layer, module)], rank=a.shape[0])
        # Scaled in float32, then to the activation dtype: the graph computes x @ A @ B.
        matrices[(layer, module)] = (a.T.astype(dtype), (b.T * np.float32(scale)).astype(dtype))
    metadata = {
        "source": str(peft_dir),
        "base_model": str(config.get("base_model_name_or_path") or ""),
        "rank": max(a.shape[1] for a, _ in matrices.values()),
        "modules": sorted({module for _, module in matrices}),
    }
    return AdapterWeights(matrices, metadata)


def _scale(config: dict[str, Any], module_path: str, rank: int) -> float:
    """PEFT's scaling for one module: lora_alpha / r (rsLoRA: / sqrt(r)), with per-module patterns."""
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module_path, config.get("lora_alpha", 8)))
    if config.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank


def _pattern_value(patterns: dict[str, Any], module_path: str, default: Any) -> Any:
    """The value of the first pattern that matches the end of `module_path`, as PEFT's get_pattern_key."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_path):  # the group: a key may hold "|"
            return value
    return default
