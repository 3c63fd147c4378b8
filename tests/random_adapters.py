"""Random LoRA adapters in textgen's own format, for the tests that need no PEFT reference.

numpy only, so that tests/ort_gpu_probe.py and tests/test_gpu.py can use it in the onnxruntime-gpu
virtualenv (no torch there).
"""

from __future__ import annotations

import numpy as np
from textgen_server.lora_format import AdapterWeights, Matrix
from textgen_server.model_config import ModelConfig

# The tiny demo exported with adapter slots (conftest.py's lora_model_dir, Makefile's models/tiny-lora).
LORA_SLOTS = 3
LORA_RANK = 16


def random_adapter(
    config: ModelConfig, rank: int, seed: int, shapes: dict[str, tuple[int, int]] | None = None
) -> AdapterWeights:
    """Rank-`rank` matrices on every projection of every layer, scaled so that the adapter changes
    the model's choices; `shapes` overrides a module's (in, out) (to make a malformed adapter)."""
    assert config.lora is not None, "the model has no adapter slots"
    rng = np.random.default_rng(seed)
    dtype = np.float16 if config.dtype == "fp16" else np.float32
    matrices: dict[tuple[int, str], tuple[Matrix, Matrix]] = {}
    for layer in range(config.num_layers):
        for module, (fan_in, fan_out) in config.lora.modules.items():
            fan_in, fan_out = (shapes or {}).get(module, (fan_in, fan_out))
            a = rng.standard_normal((fan_in, rank)) / np.sqrt(fan_in)
            b = rng.standard_normal((rank, fan_out)) / np.sqrt(rank)
            matrices[(layer, module)] = (a.astype(dtype), b.astype(dtype))
    return AdapterWeights(matrices, {"rank": rank, "source": f"random, seed {seed}"})
