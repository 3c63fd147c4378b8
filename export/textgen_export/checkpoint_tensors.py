"""A checkpoint's tensors read one at a time from its safetensors files, in the dtype the graph wants.

Loading the model through transformers holds every weight in memory at once (29 GB for Mistral-7B
in fp32), and the graph writer then made its own copies. Read this way, the exporter holds one
layer's weights at a time: each tensor is read when the graph writer asks for it and dropped once
written (native_graph.py writes it to the external data file straight away).

bf16 tensors go through torch (numpy has no bfloat16), converted exactly as transformers converts
them when it loads a bf16 checkpoint into an fp32 or fp16 model (`Tensor.to`).

The files are transformers': the shards its index names, or without an index every
`model*.safetensors` (as llama.cpp's convert_hf_to_gguf.py finds them). Mistral's repositories also
ship `consolidated.safetensors`, the same weights under mistral-inference's names: never read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import ExportError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILES = "model*.safetensors"  # model.safetensors, or model-00001-of-00003.safetensors, ...
EMBEDDINGS = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


class CheckpointTensors(Mapping[str, npt.NDArray[Any]]):
    """The tensors of a safetensors checkpoint folder by their Hugging Face names, each read from disk
    when asked for (not cached) and converted to `dtype` ("fp32" or "fp16")."""

    def __init__(self, checkpoint: Path, dtype: str, tie_word_embeddings: bool) -> None:
        self.dtype = dtype
        self._files = _tensor_files(checkpoint)
        # Tied embeddings: the LM head is the embedding table, as transformers ties them. An untied
        # checkpoint without its LM head is incomplete (transformers would start it from random).
        if tie_word_embeddings:
            self._files.pop(LM_HEAD, None)
            self._aliases = {LM_HEAD: EMBEDDINGS}
        else:
            self._aliases = {}

    def __getitem__(self, name: str) -> npt.NDArray[Any]:
        import torch
        from safetensors import safe_open

        stored = self._aliases.get(name, name)
        path = self._files.get(stored)
        if path is None:
            raise ExportError(f"the checkpoint has no tensor {stored!r} (a Mistral/Llama checkpoint has)")
        torch_dtype = torch.float16 if self.dtype == "fp16" else torch.float32
        with safe_open(str(path), framework="pt") as f:
            tensor = f.get_tensor(stored)
        array: npt.NDArray[Any] = tensor.to(torch_dtype).numpy()
        return array

    def __contains__(self, name: object) -> bool:
        """Whether the checkpoint holds `name`, without reading it."""
        return name in self._files or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        yield from self._files
        yield from self._aliases

    def __len__(self) -> int:
        return len(self._files) + len(self._aliases)

    def nbytes(self) -> int:
        """The bytes of every tensor in `dtype` (the LM head counted once more when tied)."""
        from safetensors import safe_open

        itemsize = 2 if self.dtype == "fp16" else 4
        elements = 0
        for path in sorted(set(self._files.values())):
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                    elements += int(np.prod(f.get_slice(key).get_shape()))
        if self._aliases:
            with safe_open(str(self._files[EMBEDDINGS]), framework="pt") as f:
                elements += int(np.prod(f.get_slice(EMBEDDINGS).get_shape()))
        return elements * itemsize


def has_safetensors(checkpoint: Path) -> bool:
    return (checkpoint / SAFETENSORS_INDEX).is_file() or any(checkpoint.glob(SAFETENSORS_FILES))


def _tensor_files(checkpoint: Path) -> dict[str, Path]:
    """Each tensor's file: from the shards' index where there is one, else from every model file's
    header."""
    index = checkpoint / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ExportError(f"{index}: not a safetensors index ({exc})") from exc
        missing = sorted({file for file in weight_map.values() if not (checkpoint / file).is_file()})
        if missing:
            raise ExportError(
                f"{index} names {len(missing)} file(s) the folder lacks, first {missing[0]!r} "
                "(an interrupted download?)"
            )
        return {name: checkpoint / file for name, file in weight_map.items()}
    from safetensors import safe_open

    files: dict[str, Path] = {}
    for path in sorted(checkpoint.glob(SAFETENSORS_FILES)):
        try:
            with safe_open(str(path), framework="pt") as f:
                files.update(dict.fromkeys(f.keys(), path))
        except ModuleNotFoundError:  # framework="pt" imports torch: a missing package, not a bad file
            raise
        except Exception as exc:  # safetensors raises its own error types for a bad header
            raise ExportError(f"{path}: not a readable safetensors file ({exc})") from exc
    return files
