"""The KV cache: one buffer per layer for keys and one for values, allocated once, a slot per row.

Each buffer is [slots, kv_heads, max_len, head_dim]. A forward pass binds a run of consecutive
slots of every buffer, by pointer, as both the layer's past input and its present output, so that
GroupQueryAttention writes the new columns in place: nothing is concatenated, copied or reallocated
between steps, and peak memory is what `KVCache.nbytes` says from start-up on (gpt-fast's KVCache,
onnxruntime-genai's DefaultKeyValueCache).

In host memory that is checked and committed at start-up: a cache larger than the memory this
process may still take (memory.py: the host's and its cgroup's) is refused with the largest budget
that fits, and every page is written once, so that a budget the machine cannot hold fails at start-up
rather than under load, when the kernel kills the process with every request in it. (The buffers are
zeroed pages the kernel maps only when first written; untouched, the process would look small until
the slots fill.)

Where the buffers live: on the CPU they are numpy arrays (a slot move copies only the positions in
use, its buffers split over `copy_threads`: every running stream waits for a move, and moving 3000
positions of Mistral-7B's fp32 cache, 786 MB, took 114 ms on one thread of the 2-core build machine
and 60 ms on two); on a GPU they are OrtValues in device memory and a slot move runs the exporter's
kv_copy.onnx on the model's execution provider, so the cache never crosses to the host.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from .memory import Headroom, headroom, size
from .model_config import KV_COPY_FILE, ModelConfig

log = logging.getLogger(__name__)

NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}
# Of the memory left when the cache is allocated, the share a suggested budget leaves free: prefill
# activations and the server's own needs grow with the prompt.
_SUGGESTED_SHARE = 0.8
# A host copy smaller than this runs on the calling thread: handing it to the copy threads costs
# tens of microseconds, about what copying 1 MiB saves.
PARALLEL_COPY_BYTES = 2 * 1024 * 1024


class KVBudgetError(ValueError):
    """The configured KV cache does not fit the memory this process may take."""


class KVCache:
    """Slots of KV cache for every layer; slot `i` of every buffer belongs to the same row."""

    def __init__(
        self,
        model_dir: Path,
        config: ModelConfig,
        *,
        slots: int,
        max_len: int,
        device: str,
        providers: Sequence[str],
        host_arrays: bool | None = None,
        memory: Callable[[], Headroom] | None = None,
        copy_threads: int = 1,
    ) -> None:
        """`host_arrays`: numpy buffers (default on the CPU) or OrtValues moved by the copy graph;
        `memory` says how much host memory is left (default memory.headroom), asked before a cache in
        host memory is allocated; `copy_threads`: how many threads copy host buffers (numpy lets go
        of the GIL), the forward pass's own number is a good one, as nothing else runs meanwhile."""
        if slots < 1 or max_len < 1:
            raise ValueError(f"a KV cache needs at least one slot and one position, got {slots} x {max_len}")
        self.slots = slots
        self.max_len = max_len
        self.device = device
        self.dtype = NUMPY_DTYPES[config.dtype]
        self.shape = (slots, config.num_kv_heads, max_len, config.head_dim)  # per buffer
        self.count = 2 * config.num_layers  # layer i: buffers 2i (keys) and 2i + 1 (values)
        self._slot_elems = config.num_kv_heads * max_len * config.head_dim
        self._slot_bytes = self._slot_elems * np.dtype(self.dtype).itemsize
        self._host = (device == "cpu") if host_arrays is None else host_arrays
        if device == "cpu":
            self._check_fits((memory or headroom)())
        self._copy_threads = max(1, copy_threads)
        self._copier = (
            ThreadPoolExecutor(self._copy_threads, thread_name_prefix="textgen-kv-copy")
            if self._host and self._copy_threads > 1
            else None
        )
        if self._host:
            started = time.monotonic()
            self._arrays = [np.empty(self.shape, dtype=self.dtype) for _ in range(self.count)]
            # Every page written: the memory is the process's from now on.
            self._on_every_array(lambda array: array.fill(0), self.nbytes)
            log.info("KV cache: %s committed in %.1f s", size(self.nbytes), time.monotonic() - started)
            self._pointers = [int(a.ctypes.data) for a in self._arrays]
            self._values: list[ort.OrtValue] = []
        else:
            try:
                self._values = [
                    ort.OrtValue.ortvalue_from_shape_and_type(list(self.shape), self.dtype, device, 0)
                    for _ in range(self.count)
                ]
            except Exception as exc:  # onnxruntime says only that an allocation failed
                raise KVBudgetError(
                    f"the KV cache needs {size(self.nbytes)} on {device} and allocating it failed ({exc}): "
                    "lower --max-batch-total-tokens"
                ) from exc
            self._pointers = [int(v.data_ptr()) for v in self._values]
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the copies
            self._copy = ort.InferenceSession(
                str(model_dir / KV_COPY_FILE), options, providers=list(providers)
            )

    @property
    def nbytes(self) -> int:
        """Bytes held by all the buffers: the whole cache, allocated once."""
        return self.count * self.slots * self._slot_bytes

    @property
    def position_bytes(self) -> int:
        """Bytes one position of one sequence takes, over every layer's keys and values."""
        return self.count * self._slot_bytes // self.max_len

    def _check_fits(self, room: Headroom) -> None:
        """Refuse a host cache larger than the memory left, naming the largest budget that fits."""
        if self.nbytes <= room.bytes:
            return
        fits = int(room.bytes * _SUGGESTED_SHARE) // (self.count * self._slot_bytes)  # whole sequences
        advice = (
            f"lower --max-batch-total-tokens to {fits * self.max_len} ({fits} sequences of {self.max_len})"
            if fits
            else f"not one sequence of {self.max_len} positions fits"
        )
        raise KVBudgetError(
            f"the KV cache needs {size(self.nbytes)} ({self.slots} slots x {self.max_len} positions x "
            f"{self.position_bytes / 1024:g} KiB a position) but this process may take only {size(room.bytes)} "
            f"more ({room.describe()}): {advice}, or give it more memory"
        )

    def bind(
        self, binding: ort.IOBinding, inputs: Sequence[str], outputs: Sequence[str], first: int, rows: int
    ) -> None:
        """Bind slots first..first + rows - 1 of buffer i as inputs[i] and outputs[i] (the same memory)."""
        if first < 0 or rows < 1 or first + rows > self.slots:
            raise ValueError(f"slots {first}..{first + rows - 1} outside 0..{self.slots - 1}")
        shape = [rows, *self.shape[1:]]  # [rows, kv_heads, max_len, head_dim]
        offset = first * self._slot_bytes
        for pointer, name_in, name_out in zip(self._pointers, inputs, outputs, strict=True):
            binding.bind_input(name_in, self.device, 0, self.dtype, shape, pointer + offset)
            binding.bind_output(name_out, self.device, 0, self.dtype, shape, pointer + offset)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot `src`'s first `length` positions into slot `dst` (in every buffer)."""
        if src == dst:
            return
        if self._host:

            def copy(array: npt.NDArray[Any]) -> None:
                array[dst, :, :length] = array[src, :, :length]

            self._on_every_array(copy, length * self.position_bytes)
            return
        binding = self._copy.io_binding()
        shape = [1, *self.shape[1:]]  # whole slots: a slot's first positions are not contiguous
        for i, pointer in enumerate(self._pointers):
            binding.bind_input(f"src{i}", self.device, 0, self.dtype, shape, pointer + src * self._slot_bytes)
            binding.bind_output(
                f"dst{i}", self.device, 0, self.dtype, shape, pointer + dst * self._slot_bytes
            )
        self._copy.run_with_iobinding(binding)

    def _on_every_array(self, work: Callable[[npt.NDArray[Any]], None], nbytes: int) -> None:
        """`work` on every host buffer, split over the copy threads when what it touches, `nbytes`,
        is at least PARALLEL_COPY_BYTES."""
        if self._copier is None or nbytes < PARALLEL_COPY_BYTES:
            for array in self._arrays:
                work(array)
            return

        def run(share: list[npt.NDArray[Any]]) -> None:
            for array in share:
                work(array)

        n = self._copy_threads
        # Waits for every share, and raises what one of them raised.
        list(self._copier.map(run, [self._arrays[i::n] for i in range(n)]))

    def read(self, buffer: int, slot: int, length: int) -> npt.NDArray[np.floating[Any]]:
        """A host copy of one buffer's slot, first `length` positions: [kv_heads, length, head_dim]."""
        whole = self._arrays[buffer] if self._host else np.asarray(self._values[buffer].numpy())
        return np.array(whole[slot, :, :length], copy=True)
