"""Random-weight Mistral models with the real architecture shrunk and the real tokenizer.

Nothing can be downloaded on the build machines, so tests and the demo server use these. They keep
what matters to the engine: vocabulary 32000, grouped-query attention, rope_theta 1e6 and no
sliding window, as in Mistral-7B-Instruct-v0.2. The seed is fixed: the same files every time.
The weights come from numpy (random_weights.py), so building one needs neither torch nor
transformers.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from textgen_server.model_config import DEFAULT_LORA_RANK, ModelConfig

from .onnx_export import export_checkpoint
from .random_weights import DemoSize, decoder_shape, mistral_config, random_weights, save_checkpoint

SEED = 20240216

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
    """The demo's weights as a Hugging Face checkpoint folder (config.json, model.safetensors, tokenizer.model)."""
    config = mistral_config(SIZES[size])
    save_checkpoint(config, random_weights(config, SEED), mistral_spm_model_path(), checkpoint)


def build_demo(
    out: Path,
    *,
    size: str | DemoSize = "tiny",
    dtype: str = "fp32",
    activations: str | None = None,
    overwrite: bool = False,
    lora_slots: int = 0,
    lora_rank: int = DEFAULT_LORA_RANK,
    lm_head: str | None = None,
    quality_check: bool = True,
) -> ModelConfig:
    """The demo model directory, with its checkpoint bundled in `out/checkpoint/` for parity tests.
    `size`: one of SIZES by name, or a shape of its own (bench.prefill_passes: Mistral-7B's widths
    with fewer layers).

    The graph is written from the numpy weights in memory; the checkpoint holds the same arrays.
    """
    if isinstance(size, str) and size not in SIZES:
        raise ValueError(f"unknown demo size {size!r}; expected one of {', '.join(SIZES)}")
    shape = SIZES[size] if isinstance(size, str) else size
    label = size if isinstance(size, str) else f"{shape.num_layers}-layer-h{shape.hidden_size}"
    config = mistral_config(shape)
    weights = random_weights(config, SEED)
    with tempfile.TemporaryDirectory(prefix="textgen-demo-") as tmp:
        checkpoint = Path(tmp) / "checkpoint"
        save_checkpoint(config, weights, mistral_spm_model_path(), checkpoint)
        return export_checkpoint(
            checkpoint,
            out,
            name=f"textgen-demo-{label}",
            source=f"random weights, seed {SEED}, size {label}",
            overwrite=overwrite,
            bundle_checkpoint=True,
            dtype=dtype,
            activations=activations,
            weights=(decoder_shape(config), weights),
            lora_slots=lora_slots,
            lora_rank=lora_rank,
            lm_head=lm_head,
            quality_check=quality_check,
        )
