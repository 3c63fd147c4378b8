"""Finding a Hugging Face checkpoint and reading the architecture numbers the engine needs."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textgen_server.excerpt import excerpt
from textgen_server.model_config import CARD_MAX_TOTAL_TOKENS

from .checkpoint_tensors import SAFETENSORS_FILES, SAFETENSORS_INDEX, has_safetensors
from .errors import ExportError

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("mistral", "llama")
# What a servable export needs from a hub repository (the files checkpoint_tensors reads); the rest
# (pytorch .bin duplicates, Mistral's consolidated.safetensors: 14.5 GB each for a 7B model) is
# gigabytes we never read.
HUB_ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    SAFETENSORS_FILES,
    SAFETENSORS_INDEX,
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
]


@dataclass(frozen=True)
class Architecture:
    model_type: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    bos_token_id: int
    eos_token_id: int


def resolve_source(source: str) -> Path:
    """A local folder as it is; anything else is a hub id, downloaded (where the network allows)."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ExportError(f"{source} is a file; expected a checkpoint folder or a hub id")
        return path
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ExportError(f"{source}: no such folder, and not a hub id of the form 'org/name'")
    return download_from_hub(source)


def download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    log.info("downloading %s from the Hugging Face hub (about 15 GB for a 7B model in bf16)", repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS))
    except Exception as exc:  # the hub client raises many types: network, auth, missing repo
        raise ExportError(f"cannot download {repo_id}: {type(exc).__name__}: {exc}".splitlines()[0]) from exc


def read_architecture(checkpoint: Path) -> Architecture:
    config_path = checkpoint / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{checkpoint} is not a Hugging Face checkpoint: config.json is missing")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ExportError(f"{config_path}: not valid JSON ({exc})") from exc
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ExportError(
            f"{checkpoint}: model_type {model_type!r} is not supported "
            f"(expected one of {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if not has_safetensors(checkpoint) and not any(checkpoint.glob("*.bin")):
        mistral_layout = any(checkpoint.glob("consolidated*.safetensors"))
        hint = (
            "; consolidated.safetensors is mistral-inference's layout, not transformers'"
            if mistral_layout
            else ""
        )
        raise ExportError(f"{checkpoint}: no weights ({SAFETENSORS_FILES} or pytorch *.bin) found{hint}")
    _check_config(config_path, config)
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    return Architecture(
        model_type=model_type,
        num_layers=int(config["num_hidden_layers"]),
        num_attention_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        hidden_size=hidden,
        vocab_size=int(config["vocab_size"]),
        bos_token_id=int(config.get("bos_token_id", 1)),
        eos_token_id=_first(config.get("eos_token_id", 2)),
    )


# Keys transformers would fill with other numbers than the weights' (Mistral-7B's 14336 and 8).
_REQUIRED_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_hidden_layers",
    "vocab_size",
)


def _check_config(path: Path, config: dict[str, Any]) -> None:
    """Refuse what the graph writer would leave out without a word, exporting another model."""
    required = [*_REQUIRED_KEYS, *(["num_key_value_heads"] if config["model_type"] == "mistral" else [])]
    missing = [key for key in required if config.get(key) is None]
    if missing:
        raise ExportError(f"{path}: {', '.join(missing)} missing")
    refused = []
    rope_scaling = config.get("rope_scaling")
    kind = (
        (rope_scaling.get("rope_type") or rope_scaling.get("type"))
        if isinstance(rope_scaling, dict)
        else None
    )
    if kind not in (None, "default"):
        refused.append(f"rope_scaling of type {excerpt(str(kind))}")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            refused.append(f"{key} true")
    if config.get("hidden_act", "silu") != "silu":
        refused.append(f"hidden_act {excerpt(str(config['hidden_act']))}")
    window = config.get("sliding_window")
    served = min(CARD_MAX_TOTAL_TOKENS, int(config.get("max_position_embeddings") or CARD_MAX_TOTAL_TOKENS))
    # A window as long as every sequence the server runs changes nothing (Mistral-7B v0.1: 4096).
    if isinstance(window, int) and window < served:
        refused.append(f"sliding_window {window} (shorter than the {served} positions served)")
    if refused:
        raise ExportError(f"{path}: not supported by the graph writer: {'; '.join(refused)}")


def _first(value: int | list[int]) -> int:
    return int(value[0]) if isinstance(value, list) else int(value)
