"""Random-weight Mistral models with the real architecture shrunk and the real tokenizer.

Nothing can be downloaded on the build machines, so tests and the demo server use these. They keep
what matters to the engine: vocabulary 32000, grouped-query attention, rope_theta 1e6 and no
sliding window, as in Mistral-7B-Instruct-v0.2. The seed is fixed: the same files every time.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from textgen_server.model_config import ModelConfig

from .onnx_export import export_checkpoint

SEED = 20240216


@dataclass(frozen=True)
class DemoSize:
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    intermediate_size: int


SIZES = {
    "tiny": DemoSize(
        hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2, intermediate_size=192
    ),
    # 57 M parameters: the reference size of ARCHITECTURE.md's figures.
    "bench": DemoSize(
        hidden_size=512, num_layers=8, num_attention_heads=8, num_kv_heads=2, intermediate_size=1536
    ),
    # Mistral-7B's exact shape, for GPU benchmarks (fp16 on cuda: about 14.5 GB).
    "7b": DemoSize(
        hidden_size=4096, num_layers=32, num_attention_heads=32, num_kv_heads=8, intermediate_size=14336
    ),
}


def mistral_spm_model_path() -> Path:
    """The Mistral 7B v0.1/v0.2 SentencePiece model, shipped inside the mistral-common package."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def write_demo_checkpoint(size: str, checkpoint: Path) -> None:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    shape = SIZES[size]
    config = MistralConfig(
        vocab_size=32000,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.hidden_size // shape.num_attention_heads,
        max_position_embeddings=32768,
        rope_theta=1e6,
        sliding_window=None,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = MistralForCausalLM(config).eval()
    model.save_pretrained(checkpoint)
    shutil.copyfile(mistral_spm_model_path(), checkpoint / "tokenizer.model")


def build_demo(
    out: Path,
    *,
    size: str = "tiny",
    dtype: str = "fp32",
    activations: str | None = None,
    overwrite: bool = False,
) -> ModelConfig:
    if size not in SIZES:
        raise ValueError(f"unknown demo size {size!r}; expected one of {', '.join(SIZES)}")
    with tempfile.TemporaryDirectory(prefix="textgen-demo-") as tmp:
        checkpoint = Path(tmp) / "checkpoint"
        write_demo_checkpoint(size, checkpoint)
        return export_checkpoint(
            checkpoint,
            out,
            name=f"textgen-demo-{size}",
            source=f"random weights, seed {SEED}, size {size}",
            overwrite=overwrite,
            bundle_checkpoint=True,
            dtype=dtype,
            activations=activations,
        )
