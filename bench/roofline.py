"""The memory roofline: weight bytes read per decoded token, and what share of bandwidth a rate uses.

Batch-1 decode reads every weight matrix once per token, so tokens/s can never exceed
bandwidth / bytes-per-token. What counts as read: every parameter of the checkpoint (all layers, the
final norm and `lm_head`), except the input embedding table, of which a token gathers one row only.
Activations and the KV cache are left out (small at these lengths), so the share is a lower bound on
the memory traffic actually moved.

The bound assumes the weights come from memory. Where they fit in the last-level cache, each token
reads them from the cache instead, the "roofline" is no ceiling at all (shares above 100% were seen
with a 300 MB L3), and the report says it does not apply.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

# Checkpoint names of input embedding tables (Mistral/Llama); lm_head is a matmul and is read in full.
EMBEDDING_SUFFIXES = ("embed_tokens.weight",)

_SAFETENSORS_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class WeightTraffic:
    bytes_per_token: int
    parameter_bytes: int  # the whole checkpoint, embedding table included
    parameters: int
    excluded: tuple[str, ...]  # tables counted as one row only

    def to_dict(self) -> dict[str, object]:
        return {
            "bytes_per_token": self.bytes_per_token,
            "parameter_bytes": self.parameter_bytes,
            "parameters": self.parameters,
            "embedding_tables_counted_as_one_row": list(self.excluded),
            "definition": "sum of all parameter bytes (every layer, final norm, lm_head), with the "
            "input embedding table counted as one row (a token gathers one row)",
        }


def parse_safetensors_header(data: bytes) -> list[Tensor]:
    """Tensors listed in a safetensors header: 8-byte little-endian length, then JSON."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        shape = tuple(int(d) for d in entry["shape"])
        expected = _SAFETENSORS_DTYPE_BYTES[entry["dtype"]] * _product(shape)
        if end - begin != expected:
            raise ValueError(f"{name}: {end - begin} bytes stored for {entry['dtype']}{list(shape)}")
        tensors.append(Tensor(name=name, shape=shape, nbytes=end - begin))
    return tensors


def read_checkpoint_tensors(checkpoint: Path) -> list[Tensor]:
    """Every tensor in the checkpoint's *.safetensors files, read from the headers only."""
    tensors: list[Tensor] = []
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{checkpoint}: no *.safetensors files")
    for path in files:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            tensors += parse_safetensors_header(struct.pack("<Q", length) + f.read(length))
    return tensors


def weight_traffic(
    tensors: Iterable[Tensor],
    embedding_suffixes: tuple[str, ...] = EMBEDDING_SUFFIXES,
) -> WeightTraffic:
    """Bytes one batch-1 decode step reads from weights: all of them, embedding tables as one row."""
    per_token = whole = params = 0
    excluded = []
    for t in tensors:
        whole += t.nbytes
        params += _product(t.shape)
        if t.name.endswith(embedding_suffixes):
            per_token += t.nbytes // t.shape[0]  # [vocab, hidden]: one row
            excluded.append(t.name)
        else:
            per_token += t.nbytes
    return WeightTraffic(
        bytes_per_token=per_token, parameter_bytes=whole, parameters=params, excluded=tuple(excluded)
    )


def roofline_tok_s(bytes_per_token: int, bandwidth_bytes_s: float) -> float:
    """The most tokens/s that reading the weights once per token allows."""
    return bandwidth_bytes_s / bytes_per_token


def roofline_share(bytes_per_token: int, tok_s: float, bandwidth_bytes_s: float) -> float:
    """Bytes/s the decode loop reads from weights as a share of the measured read bandwidth."""
    if bandwidth_bytes_s <= 0:
        raise ValueError("bandwidth must be positive")
    return bytes_per_token * tok_s / bandwidth_bytes_s


def roofline_shares(
    bytes_per_token: int, rates: Mapping[str, float | None], bandwidth_bytes_s: float
) -> dict[str, float | None]:
    return {
        name: None if rate is None else roofline_share(bytes_per_token, rate, bandwidth_bytes_s)
        for name, rate in rates.items()
    }


# How many times the last-level cache the weights read per token must be for memory bandwidth to
# bound decoding: a cache holding a good part of them serves those reads faster than memory does.
LLC_MULTIPLE = 4


def roofline_applies(bytes_per_token: int, llc_bytes: int | None) -> bool:
    """True where the weights a token reads are at least LLC_MULTIPLE times the last-level cache, or
    where the cache size is unknown (the report then says so beside the row); False where a good
    part of them could sit in that cache."""
    return llc_bytes is None or bytes_per_token >= LLC_MULTIPLE * llc_bytes


def _product(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
