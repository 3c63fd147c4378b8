"""ONNX Runtime forward passes with the KV cache kept on the device between steps.

The graph is optimum's `text-generation-with-past` export: inputs `input_ids`, `attention_mask`,
`position_ids` and `past_key_values.{i}.key/value`; outputs `logits` (last position only, see the
exporter) and `present.{i}.key/value`. Each step's presents are bound, as the OrtValues ORT
allocated, as the next step's past: the cache never passes through numpy while decoding, and only
the logits are copied to the host.

Batches are left-padded (text-generation-inference's CausalLMBatch): every row ends at the same
column, so one decode step appends one column for all rows. Padding columns are masked out by
`attention_mask`, and positions count real tokens only, so a row computes the same values as it
would alone (up to float rounding: ORT's GEMM blocks rows of a larger batch differently). Joining
and slicing batches runs on the device too (kv_ops).

Why this layout here: with optimum's graph the cache grows by concatenation each step, so a static
preallocated cache would need another graph; the concat costs one pass over the cache per step,
small beside reading every weight once per step at batch 1 and shared by all rows at batch 16.

Where per-request LoRA adapters will go: ONNX Runtime activates a `LoraAdapter` for a whole run
through `RunOptions`, so the scheduler will group rows by adapter and `prefill`/`decode` will pass
each group's run options to `run_with_iobinding`. Grammar masks need nothing here: they act on the logits rows
(sampling's `allowed_mask`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from .kv_ops import KVOps
from .model_config import KV_JOIN_FILE, KV_SELECT_FILE, MODEL_FILE, ModelConfig

log = logging.getLogger(__name__)

PROVIDERS = ("auto", "cuda", "cpu")
_NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}


@dataclass
class KVBatch:
    """The state of a left-padded batch between steps; row order is the caller's."""

    past: list[ort.OrtValue]  # 2 * layers values, each [batch, kv_heads, width, head_dim]
    attention_mask: npt.NDArray[np.int64]  # [batch, width]; 0 on left padding
    positions: npt.NDArray[np.int64]  # [batch] position of each row's next token

    @property
    def size(self) -> int:
        return int(self.attention_mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.attention_mask.shape[1])


def select_providers(provider: str) -> list[str]:
    available = ort.get_available_providers()
    if provider not in PROVIDERS:
        raise ValueError(f"provider {provider!r}: expected one of {', '.join(PROVIDERS)}")
    if provider == "cuda" and "CUDAExecutionProvider" not in available:
        raise RuntimeError(
            f"CUDA was asked for but this onnxruntime offers only {available}; "
            "install onnxruntime-gpu (pip install 'textgen[gpu]')"
        )
    if provider in ("auto", "cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class Engine:
    """Prefill and one-token decode over left-padded batches of token sequences."""

    def __init__(self, model_dir: Path, *, provider: str = "auto", threads: int | None = None) -> None:
        self.config = ModelConfig.load(model_dir)
        missing = [
            name for name in (MODEL_FILE, KV_JOIN_FILE, KV_SELECT_FILE) if not (model_dir / name).is_file()
        ]
        if missing:
            raise FileNotFoundError(
                f"{model_dir}: {', '.join(missing)} missing; the directory is incomplete or from an older "
                "exporter: export it again (textgen-export ... --overwrite)"
            )
        if not self.config.logits_last_position_only:
            raise ValueError(f"{model_dir}: re-export the model: this engine expects last-position logits")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or 0  # 0: ORT picks one per physical core
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Shapes change every step (the cache grows); pattern planning would only be redone each time.
        options.enable_mem_pattern = False
        self.session = ort.InferenceSession(
            str(model_dir / MODEL_FILE), sess_options=options, providers=select_providers(provider)
        )
        self.execution_provider = self.session.get_providers()[0]
        self.device = "cuda" if self.execution_provider == "CUDAExecutionProvider" else "cpu"
        self.kv_dtype = _NUMPY_DTYPES[self.config.dtype]
        self._kv_ops = KVOps(model_dir, 2 * self.config.num_layers, self.session.get_providers(), self.device)
        io = self.config.io
        layers = range(self.config.num_layers)
        self._past_names = [name for i in layers for name in (io.past_key.format(i), io.past_value.format(i))]
        self._present_names = [
            name for i in layers for name in (io.present_key.format(i), io.present_value.format(i))
        ]
        log.info(
            "loaded %s on %s (%s, %d layers)",
            self.config.name,
            self.execution_provider,
            self.config.dtype,
            self.config.num_layers,
        )

    # -- forward passes -------------------------------------------------------------------------

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[KVBatch, npt.NDArray[np.float32]]:
        """Run whole prompts in one left-padded pass; returns the batch and next-token logits [batch, vocab]."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prefill needs at least one non-empty prompt")
        width = max(len(p) for p in prompts)
        input_ids = np.zeros((len(prompts), width), dtype=np.int64)  # [batch, width]
        mask = np.zeros((len(prompts), width), dtype=np.int64)  # [batch, width]
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = prompt
            mask[row, width - len(prompt) :] = 1
        position_ids = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # [batch, width]
        c = self.config
        empty_past = np.zeros((len(prompts), c.num_kv_heads, 0, c.head_dim), dtype=self.kv_dtype)
        binding = self.session.io_binding()
        binding.bind_cpu_input(c.io.input_ids, input_ids)
        binding.bind_cpu_input(c.io.attention_mask, mask)
        binding.bind_cpu_input(c.io.position_ids, position_ids)
        for name in self._past_names:
            binding.bind_cpu_input(name, empty_past)
        presents, logits = self._run(binding)
        batch = KVBatch(past=presents, attention_mask=mask, positions=mask.sum(axis=1).astype(np.int64))
        return batch, logits

    def decode(self, batch: KVBatch, tokens: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """Append one token per row (`tokens` [batch]); updates `batch` in place; logits [batch, vocab]."""
        c = self.config
        mask = np.concatenate([batch.attention_mask, np.ones((batch.size, 1), dtype=np.int64)], axis=1)
        binding = self.session.io_binding()
        binding.bind_cpu_input(c.io.input_ids, tokens.reshape(batch.size, 1).astype(np.int64))
        binding.bind_cpu_input(c.io.attention_mask, mask)
        binding.bind_cpu_input(c.io.position_ids, batch.positions.reshape(batch.size, 1))
        for name, value in zip(self._past_names, batch.past, strict=True):
            binding.bind_ortvalue_input(name, value)
        presents, logits = self._run(binding)
        batch.past = presents
        batch.attention_mask = mask
        batch.positions = batch.positions + 1
        return logits

    def _run(self, binding: ort.IOBinding) -> tuple[list[ort.OrtValue], npt.NDArray[np.float32]]:
        # Presents stay where ORT put them (device memory on CUDA); logits come to the host.
        for name in self._present_names:
            binding.bind_output(name, self.device)
        binding.bind_output(self.config.io.logits, "cpu")
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits = outputs[-1].numpy()[:, -1, :].astype(np.float32, copy=False)  # [batch, vocab]
        return list(outputs[:-1]), logits

    # -- joining and leaving batches -------------------------------------------------------------

    def concatenate(self, batches: Sequence[KVBatch]) -> KVBatch:
        """One batch from several: rows in order, the narrower ones padded on the left."""
        joined = batches[0]
        for batch in batches[1:]:
            width = max(joined.width, batch.width)
            masks = [np.pad(b.attention_mask, ((0, 0), (width - b.width, 0))) for b in (joined, batch)]
            joined = KVBatch(
                past=self._kv_ops.join(joined.past, batch.past, width),
                attention_mask=np.concatenate(masks, axis=0),
                positions=np.concatenate([joined.positions, batch.positions]),
            )
        return joined

    def filter(self, batch: KVBatch, keep: Sequence[int]) -> KVBatch:
        """Keep the rows `keep`, in that order, and drop left columns that are padding in all of them."""
        rows = np.asarray(keep, dtype=np.int64)
        mask = batch.attention_mask[rows]
        first_used = int(np.argmax(mask.any(axis=0))) if mask.any() else mask.shape[1]
        return KVBatch(
            past=self._kv_ops.select(batch.past, rows.tolist(), first_used),
            attention_mask=np.ascontiguousarray(mask[:, first_used:]),
            positions=batch.positions[rows],
        )

    @property
    def threads(self) -> int:
        return self.session.get_session_options().intra_op_num_threads or (os.cpu_count() or 1)
