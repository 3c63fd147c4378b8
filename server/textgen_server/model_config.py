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
# What the exporter writes: 3 = GroupQueryAttention over a cache allocated once, with gate and up as
# two projections and the lora groups listed in textgen.json. The engine also reads 2, the same but
# for gate/up packed into one (PACKED_GATE_UP_GROUPS), not 1 (concatenated caches). A server older
# than 3 refuses a 3 as written by a newer textgen rather than bind adapter inputs its graph lacks.
FORMAT_VERSION = 3
OLDEST_READ_FORMAT = 2

# The limits of the Workers AI card for @hf/mistral/mistral-7b-instruct-v0.2.
CARD_MODEL_NAME = "@hf/mistral/mistral-7b-instruct-v0.2"
CARD_MAX_INPUT_LENGTH = 3072
CARD_MAX_TOTAL_TOKENS = 4096
CARD_MAX_BATCH_PREFILL_TOKENS = 8192

ACTIVATION_DTYPES = ("fp32", "fp16")  # textgen.json's dtype: activations and KV cache
WEIGHT_DTYPES = ("fp32", "fp16", "int4", "int8")  # its weight_dtype (int4/int8: MatMulNBits)

# LoRA: the projections the graph has adapter slots for, grouped as the graph packs them (q/k/v are
# one MatMul; gate and up are two, like o and down): a group's adapters are concatenated along the rank
# (A) and placed block-diagonally (B), each member in its own `rank`-wide block.
LORA_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate": ("gate_proj",),
    "up": ("up_proj",),
    "down": ("down_proj",),
}
# The groups of format 2, whose textgen.json does not list them: gate/up were then one MatMul too, whose
# output a Split copied into two, and their adapters' B was block-diagonal, half of it zeros.
PACKED_GATE_UP_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
LORA_MODULES = tuple(module for members in LORA_GROUPS.values() for module in members)
# The largest adapter rank an export's slots hold unless told otherwise (--lora-rank). Ranks 8 and 16
# are the common PEFT choices and Workers AI's older limit was 8; its newer one, 32, costs twice the
# adapter work in every pass that uses an adapter.
DEFAULT_LORA_RANK = 16


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
    # With LoRA slots: each row's adapter slot (0 = the base model), and per layer and group (formatted
    # with both) the stacked adapter weights, A [slots + 1, in, group rank] and B [slots + 1, group rank, out].
    lora_index: str = "lora_index"  # [batch] int64
    lora_a: str = "lora.{}.{}.A"
    lora_b: str = "lora.{}.{}.B"


@dataclass(frozen=True)
class LoraLayout:
    """The adapter slots a graph was exported with (`textgen-export ... --lora-slots N --lora-rank R`)."""

    slots: int  # adapters resident at once; the stacks have slots + 1 rows, row 0 all zeros (the base model)
    rank: int  # the largest rank an adapter may have on any projection
    modules: dict[str, tuple[int, int]]  # projection (q_proj, ...) -> (in features, out features)
    # group (the graph's lora.{layer}.{group}.A/B inputs) -> its member projections, in packing order
    groups: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(LORA_GROUPS))

    def group_shape(self, group: str) -> tuple[int, int, int]:
        """(in, rank, out) of a group's stacked matrices: members side by side along rank and out."""
        members = self.groups[group]
        return (
            self.modules[members[0]][0],
            self.rank * len(members),
            sum(self.modules[m][1] for m in members),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraLayout:
        modules = {name: (int(dims[0]), int(dims[1])) for name, dims in data["modules"].items()}
        listed = data.get("groups")
        if listed is None:
            groups = dict(PACKED_GATE_UP_GROUPS)
        elif isinstance(listed, dict) and all(
            isinstance(members, list) and all(isinstance(m, str) for m in members)
            for members in listed.values()
        ):
            groups = {str(group): tuple(members) for group, members in listed.items()}
        else:
            raise TypeError(
                f"lora groups must map each group to a list of projection names, got {listed!r:.80}"
            )
        return cls(slots=int(data["slots"]), rank=int(data["rank"]), modules=modules, groups=groups)


_POSITIVE_FIELDS = (
    "num_layers",
    "num_kv_heads",
    "head_dim",
    "vocab_size",
    "max_input_length",
    "max_total_tokens",
    "max_batch_prefill_tokens",
    "format_version",
)
_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "unk_token_id")
_DTYPES = {"dtype": ACTIVATION_DTYPES, "weight_dtype": WEIGHT_DTYPES}


def _value_problems(data: dict[str, Any]) -> list[str]:
    """What in a textgen.json object no model could have: each field named with what it holds."""
    problems = []
    for name in _POSITIVE_FIELDS:
        value = data.get(name, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{name} must be a positive integer, got {value!r:.40}")
    vocab = data.get("vocab_size")
    for name in _TOKEN_FIELDS:
        value = data.get(name, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            problems.append(f"{name} must be a token id, got {value!r:.40}")
        elif isinstance(vocab, int) and value >= vocab:
            problems.append(f"{name} {value} is past the vocabulary ({vocab} tokens)")
    for name, allowed in _DTYPES.items():
        if name in data and data[name] not in allowed:
            problems.append(f"{name} must be one of {', '.join(allowed)}, got {data[name]!r:.40}")
    total, longest_input = data.get("max_total_tokens"), data.get("max_input_length")
    if isinstance(total, int) and isinstance(longest_input, int) and not problems and longest_input >= total:
        problems.append(
            f"max_input_length {longest_input} leaves no room to generate in max_total_tokens {total}"
        )
    return problems


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
    # Adapter slots in the graph; None: exported without (requests cannot name an adapter).
    lora: LoraLayout | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        io = ModelIO(**data.pop("io", {}))
        lora = data.pop("lora", None)
        return cls(io=io, lora=LoraLayout.from_dict(lora) if lora else None, **data)

    def save(self, model_dir: Path) -> None:
        (model_dir / CONFIG_FILE).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, model_dir: Path) -> ModelConfig:
        path = model_dir / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir} is not a textgen model directory: {CONFIG_FILE} is missing")
        again = "export it again (textgen-export ... --overwrite)"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not valid JSON ({exc}); {again}") from exc
        if not isinstance(data, dict):
            raise TypeError(f"{path}: expected a JSON object, got {type(data).__name__}; {again}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        required = [
            name
            for name, f in known.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in data]
        unknown = sorted(set(data) - set(known))
        if missing or unknown:
            problems = [f"lacks {', '.join(missing)}"] if missing else []
            problems += [f"has fields this server does not know: {', '.join(unknown)}"] if unknown else []
            raise ValueError(f"{path}: {'; '.join(problems)}; {again}")
        problems = _value_problems(data)
        if problems:
            raise ValueError(f"{path}: {'; '.join(problems)}; {again}")
        try:
            return cls.from_dict(data)
        except (TypeError, KeyError, ValueError) as exc:  # an unknown graph IO name, a malformed lora
            raise ValueError(f"{path}: {type(exc).__name__}: {exc}; {again}") from exc
