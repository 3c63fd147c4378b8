"""Random-weight Mistral decoders from numpy: no torch needed to make a demo model.

The weights are drawn as transformers initialises a new `MistralForCausalLM` (projections and
embeddings ~ N(0, 0.02), RMSNorm weights 1) from numpy's generator with a fixed seed, so the same
seed gives the same bytes on every machine. They go two ways: straight into the native graph writer
(what `make serve` needs), and into a Hugging Face checkpoint (`config.json`, `model.safetensors`,
`tokenizer.model`) that transformers loads for the parity tests.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import numpy.typing as npt

from .native_graph import DecoderShape

# Mistral-7B-Instruct-v0.2's config.json, less the sizes that the demo shrinks.
MISTRAL_V02_CONFIG: dict[str, Any] = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "vocab_size": 32000,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "use_cache": True,
}


@dataclass(frozen=True)
class DemoSize:
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    intermediate_size: int


def mistral_config(size: DemoSize) -> dict[str, Any]:
    """The checkpoint's `config.json`: Mistral-7B-Instruct-v0.2's, with `size`'s dimensions."""
    return {
        **MISTRAL_V02_CONFIG,
        "hidden_size": size.hidden_size,
        "intermediate_size": size.intermediate_size,
        "num_hidden_layers": size.num_layers,
        "num_attention_heads": size.num_attention_heads,
        "num_key_value_heads": size.num_kv_heads,
        "head_dim": size.hidden_size // size.num_attention_heads,
    }


def decoder_shape(config: dict[str, Any]) -> DecoderShape:
    """What the graph writer needs from `config`, read as the exporter reads a checkpoint's."""
    return DecoderShape.from_hf_config(
        SimpleNamespace(**config), max_positions=int(config["max_position_embeddings"])
    )


def random_weights(config: dict[str, Any], seed: int) -> dict[str, npt.NDArray[np.float32]]:
    """Every tensor of `MistralForCausalLM(config)` by its Hugging Face name, in float32."""
    rng = np.random.default_rng(seed)
    std = float(config["initializer_range"])
    hidden = int(config["hidden_size"])
    inter = int(config["intermediate_size"])
    head_dim = int(config["head_dim"])
    q_width = int(config["num_attention_heads"]) * head_dim
    kv_width = int(config["num_key_value_heads"]) * head_dim
    vocab = int(config["vocab_size"])

    def normal(*shape: int) -> npt.NDArray[np.float32]:
        values = rng.standard_normal(shape, dtype=np.float32)  # drawn in float32: 7b is 29 GB, not 58
        values *= np.float32(std)
        return values

    def ones(width: int) -> npt.NDArray[np.float32]:
        return np.ones(width, dtype=np.float32)

    # Linear weights are [out_features, in_features], as torch stores them.
    weights = {"model.embed_tokens.weight": normal(vocab, hidden)}
    for layer in range(int(config["num_hidden_layers"])):
        p = f"model.layers.{layer}."
        weights |= {
            p + "self_attn.q_proj.weight": normal(q_width, hidden),
            p + "self_attn.k_proj.weight": normal(kv_width, hidden),
            p + "self_attn.v_proj.weight": normal(kv_width, hidden),
            p + "self_attn.o_proj.weight": normal(hidden, q_width),
            p + "mlp.gate_proj.weight": normal(inter, hidden),
            p + "mlp.up_proj.weight": normal(inter, hidden),
            p + "mlp.down_proj.weight": normal(hidden, inter),
            p + "input_layernorm.weight": ones(hidden),
            p + "post_attention_layernorm.weight": ones(hidden),
        }
    weights["model.norm.weight"] = ones(hidden)
    weights["lm_head.weight"] = normal(vocab, hidden)
    return weights


def save_checkpoint(
    config: dict[str, Any],
    weights: dict[str, npt.NDArray[np.float32]],
    spm_model: Path,
    checkpoint: Path,
) -> None:
    """A Hugging Face checkpoint folder that `MistralForCausalLM.from_pretrained` loads."""
    from safetensors.numpy import save_file

    checkpoint.mkdir(parents=True, exist_ok=True)
    (checkpoint / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    # transformers refuses a safetensors file whose metadata names no framework it knows.
    save_file(weights, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(spm_model, checkpoint / "tokenizer.model")
