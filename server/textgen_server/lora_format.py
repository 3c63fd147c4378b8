"""The converted LoRA adapter file: what `textgen-export lora` writes and the server loads.

A numpy `.npz` (no torch or safetensors needed to read it), written for one base model directory:

- `layers.{i}.{module}.A` [in, r] and `layers.{i}.{module}.B` [r, out] for each adapted projection
  (`module` one of model_config.LORA_MODULES), in the base model's activation dtype, with PEFT's
  scale (lora_alpha / r, or / sqrt(r) for rsLoRA) folded into B: the projection's delta is x @ A @ B;
- `textgen_lora`: a JSON string (format version, rank, where it came from).

`check_adapter` is the one set of rules both sides apply: every module has a slot in the graph, the
shapes match the base, the rank fits the graph's slots, the values are finite.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .model_config import LORA_MODULES, ModelConfig

ADAPTER_SUFFIX = ".npz"
FORMAT_VERSION = 1
METADATA_KEY = "textgen_lora"
_KEY = re.compile(r"layers\.(\d+)\.([a-z_]+)\.([AB])")

Matrix = npt.NDArray[np.floating[Any]]


class AdapterFormatError(ValueError):
    """An adapter that does not fit the base model; the message is one line naming what is wrong."""


@dataclass(frozen=True)
class AdapterWeights:
    """One adapter's matrices by (layer, module): A [in, r], B [r, out] (scale folded into B)."""

    matrices: dict[tuple[int, str], tuple[Matrix, Matrix]]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max((a.shape[1] for a, _ in self.matrices.values()), default=0)

    @property
    def modules(self) -> list[str]:
        """The projections it adapts, in the graph's order."""
        present = {module for _, module in self.matrices}
        return [m for m in LORA_MODULES if m in present]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.matrices.values())


def check_adapter(weights: AdapterWeights, config: ModelConfig) -> None:
    """Raise AdapterFormatError unless `weights` fits the adapter slots of the model `config` describes."""
    layout = config.lora
    if layout is None:
        raise AdapterFormatError(
            f"the base model {config.name!r} was exported without adapter slots "
            "(export it again with --lora-slots N)"
        )
    if not weights.matrices:
        raise AdapterFormatError("the adapter has no LoRA matrices")
    for (layer, module), (a, b) in sorted(weights.matrices.items()):
        where = f"layer {layer} {module}"
        if module not in layout.modules:
            raise AdapterFormatError(
                f"{where}: the graph has no adapter slot for {module!r} "
                f"(it has slots for {', '.join(layout.modules)})"
            )
        if not 0 <= layer < config.num_layers:
            raise AdapterFormatError(f"{where}: the base model has layers 0..{config.num_layers - 1}")
        fan_in, fan_out = layout.modules[module]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise AdapterFormatError(
                f"{where}: A {list(a.shape)} and B {list(b.shape)} are not [in, r] and [r, out]"
            )
        rank = a.shape[1]
        if a.shape[0] != fan_in or b.shape[1] != fan_out:
            raise AdapterFormatError(
                f"{where}: shapes A {list(a.shape)}, B {list(b.shape)} do not match the base model's "
                f"projection ({fan_in} in, {fan_out} out)"
            )
        if not 1 <= rank <= layout.rank:
            raise AdapterFormatError(
                f"{where}: rank {rank} is over the {layout.rank} the model's adapter slots hold "
                "(export the model with a larger --lora-rank)"
            )
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise AdapterFormatError(f"{where}: the matrices hold NaN or infinite values")


def save_adapter(weights: AdapterWeights, path: Path) -> Path:
    """Write `weights` to `path` (".npz" appended when it has another suffix or none); atomic, so a
    server rescanning the directory never sees half a file. Returns the path written."""
    if path.suffix != ADAPTER_SUFFIX:
        path = path.with_name(path.name + ADAPTER_SUFFIX)
    arrays: dict[str, Any] = {
        METADATA_KEY: np.array(json.dumps({"format": FORMAT_VERSION, **weights.metadata}))
    }
    for (layer, module), (a, b) in sorted(weights.matrices.items()):
        arrays[f"layers.{layer}.{module}.A"] = np.ascontiguousarray(a)
        arrays[f"layers.{layer}.{module}.B"] = np.ascontiguousarray(b)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not ending in .npz while partial: a rescan ignores it.
    fd, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.chmod(partial, 0o644)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return path


def load_adapter(path: Path, config: ModelConfig) -> AdapterWeights:
    """Read and check an adapter file for the model `config` describes (AdapterFormatError if it does
    not fit, OSError if it cannot be read). The matrices come back in the model's activation dtype."""
    dtype = np.float16 if config.dtype == "fp16" else np.float32
    try:
        metadata, halves = _read_arrays(path, dtype)
    except AdapterFormatError:
        raise
    except (ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:  # not our file
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        raise AdapterFormatError(f"unreadable adapter file ({reason})") from exc
    matrices: dict[tuple[int, str], tuple[Matrix, Matrix]] = {}
    for (layer, module), pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise AdapterFormatError(f"layer {layer} {module}: has {''.join(pair)} but not both A and B")
        matrices[(layer, module)] = (pair["A"], pair["B"])
    weights = AdapterWeights(matrices, metadata)
    check_adapter(weights, config)
    return weights


def _read_arrays(
    path: Path, dtype: type[np.floating[Any]]
) -> tuple[dict[str, Any], dict[tuple[int, str], dict[str, Matrix]]]:
    """The archive's metadata, and its A and B arrays by (layer, module) in `dtype`."""
    if not zipfile.is_zipfile(path):  # np.load would try it as a pickle
        raise AdapterFormatError("not an .npz archive (convert the adapter with textgen-export lora)")
    archive = np.load(path, allow_pickle=False)
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise AdapterFormatError("not an .npz archive (convert the adapter with textgen-export lora)")
    with archive:
        if METADATA_KEY not in archive.files:
            raise AdapterFormatError(
                f"not a textgen adapter ({METADATA_KEY} missing); convert it with textgen-export lora"
            )
        metadata = json.loads(str(archive[METADATA_KEY]))
        if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_VERSION:
            found = metadata.get("format") if isinstance(metadata, dict) else None
            raise AdapterFormatError(
                f"adapter format {found!r}, this server reads {FORMAT_VERSION}: "
                "convert it again with textgen-export lora"
            )
        halves: dict[tuple[int, str], dict[str, Matrix]] = {}
        for key in archive.files:
            if key == METADATA_KEY:
                continue
            match = _KEY.fullmatch(key)
            if match is None:
                raise AdapterFormatError(f"unexpected array {key[:80]!r}")
            array = archive[key]
            if array.dtype.kind != "f":
                raise AdapterFormatError(f"{key}: dtype {array.dtype}, expected floating point")
            layer, module, half = int(match[1]), match[2], match[3]
            halves.setdefault((layer, module), {})[half] = array.astype(dtype, copy=False)
    return metadata, halves
