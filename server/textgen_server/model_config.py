"""The small config that makes a model directory servable on its own.

The exporter writes it as `textgen.json` next to `model.onnx` and `tokenizer.json`; the server
reads nothing else. Standard library only: the exporter imports it without the server's extras.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_FILE = "textgen.json"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
# A small graph that copies one KV slot to another on the model's device (a row leaving the batch).
KV_COPY_FILE = "kv_copy.onnx"
# What the engine reads: 2 = GroupQueryAttention over a cache allocated once (1: concatenated caches).
FORMAT_VERSION = 2

# The limits of the Workers AI card for @hf/mistral/mistral-7b-instruct-v0.2.
CARD_MODEL_NAME = "@hf/mistral/mistral-7b-instruct-v0.2"
CARD_MAX_INPUT_LENGTH = 3072
CARD_MAX_TOTAL_TOKENS = 4096
CARD_MAX_BATCH_PREFILL_TOKENS = 8192


@dataclass(frozen=True)
class ModelIO:
    """Names of the decoder graph's inputs and outputs (textgen_export.native_graph writes them)."""

    input_ids: str = "input_ids"  # [batch, seq] int64
    seqlens_k: str = "seqlens_k"  # [batch] int32: each row's total length (past + seq) - 1
    total_sequence_length: str = "total_sequence_length"  # [] int32: the longest row's total length
    logits: str = "logits"  # [batch, 1, vocab] float32
    # Formatted with the layer index; [batch, kv_heads, max_len, head_dim], past and present alike.
    past_key: str = "past_key_values.{}.key"
    past_value: str = "past_key_values.{}.value"
    present_key: str = "present.{}.key"
    present_value: str = "present.{}.value"


@dataclass(frozen=True)
class ModelConfig:
    name: str
    dtype: str  # activations and KV cache: "fp32" or "fp16"
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    bos_token_id: int = 1
    eos_token_id: int = 2
    unk_token_id: int = 0
    max_input_length: int = CARD_MAX_INPUT_LENGTH
    max_total_tokens: int = CARD_MAX_TOTAL_TOKENS
    max_batch_prefill_tokens: int = CARD_MAX_BATCH_PREFILL_TOKENS
    # True when the graph computes logits for the last position only: [batch, 1, vocab].
    logits_last_position_only: bool = True
    # Directories written before this field existed read as 1; the exporter writes FORMAT_VERSION.
    format_version: int = 1
    io: ModelIO = field(default_factory=ModelIO)
    source: str = ""
    weight_dtype: str = "fp32"  # "fp32", "fp16", "int4" or "int8" (MatMulNBits)
    # For int4/int8: block size, accuracy level and the measured agreement with the unquantized model.
    quantization: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        io = ModelIO(**data.pop("io", {}))
        return cls(io=io, **data)

    def save(self, model_dir: Path) -> None:
        (model_dir / CONFIG_FILE).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, model_dir: Path) -> ModelConfig:
        path = model_dir / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir} is not a textgen model directory: {CONFIG_FILE} is missing")
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
