"""Joining and slicing KV caches on the device, with the exporter's two small graphs.

`kv_join.onnx` and `kv_select.onnx` (see textgen_export.kv_graphs) run on the model's execution
provider, so continuous batching never copies a cache through the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .model_config import KV_JOIN_FILE, KV_SELECT_FILE


class KVOps:
    """Batch surgery on lists of cache tensors ([batch, kv_heads, width, head_dim] OrtValues)."""

    def __init__(self, model_dir: Path, count: int, providers: Sequence[str], device: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # memory copies: more threads only contend
        self._join = ort.InferenceSession(str(model_dir / KV_JOIN_FILE), options, providers=list(providers))
        self._select = ort.InferenceSession(
            str(model_dir / KV_SELECT_FILE), options, providers=list(providers)
        )
        self._count = count
        self._device = device

    def join(self, a: Sequence[ort.OrtValue], b: Sequence[ort.OrtValue], width: int) -> list[ort.OrtValue]:
        """Rows of `a` then rows of `b`, each left-padded with zeros to `width` columns."""
        binding = self._join.io_binding()
        for name, values in (("pad_a", a), ("pad_b", b)):
            pad = width - values[0].shape()[2]
            binding.bind_cpu_input(name, np.array([0, 0, pad, 0, 0, 0, 0, 0], dtype=np.int64))
        for i in range(self._count):
            binding.bind_ortvalue_input(f"a{i}", a[i])
            binding.bind_ortvalue_input(f"b{i}", b[i])
            binding.bind_output(f"out{i}", self._device)
        self._join.run_with_iobinding(binding)
        return list(binding.get_outputs())

    def select(self, values: Sequence[ort.OrtValue], rows: Sequence[int], first: int) -> list[ort.OrtValue]:
        """Rows `rows`, in that order, from column `first` on."""
        binding = self._select.io_binding()
        binding.bind_cpu_input("rows", np.asarray(rows, dtype=np.int64))
        binding.bind_cpu_input("first", np.array([first], dtype=np.int64))
        for i in range(self._count):
            binding.bind_ortvalue_input(f"x{i}", values[i])
            binding.bind_output(f"out{i}", self._device)
        self._select.run_with_iobinding(binding)
        return list(binding.get_outputs())
