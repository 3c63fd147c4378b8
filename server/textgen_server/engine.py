"""ONNX Runtime forward passes over a KV cache allocated once, a slot per running sequence.

The graph (textgen_export.native_graph) attends with GroupQueryAttention: each layer's past key and
value are a run of slots of the cache's buffers (kv_cache.py), bound as the presents too, so the op
writes new columns in place. A row's position is its own: `seqlens_k` says how long each row is, so
rows of any lengths decode together with no padding, and joining or leaving the batch moves no other
row's cache.

Two passes, as in gpt-fast:
- `prefill(slot, tokens, start)`: one sequence, `tokens` appended at positions start.. of its slot
  (a whole prompt, or one chunk of a long one). One row per call: onnxruntime-gpu 1.31.1's
  GroupQueryAttention has no per-row query lengths, so several new tokens over an existing cache
  are only well defined for batch 1.
- `decode(tokens, lengths)`: one new token for each of rows 0..n-1, which sit in slots 0..n-1 (the
  scheduler keeps running rows in the first slots; `move_slot` fills the gap a leaving row leaves).

With adapter slots in the graph (exported with --lora-slots), each row also names its adapter slot
(`adapter`, `adapters`; 0 is the base model) and `load_adapter` writes an adapter into a slot of the
stacked weights (lora_stacks.py), which every pass binds by pointer: any mix of adapters in one pass.

Only the logits come to the host. Grammar masks need nothing here: they act on the logits rows
(sampling's `allowed_mask`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from .kv_cache import KVCache
from .lora_format import AdapterWeights
from .lora_stacks import LoraStacks
from .model_config import FORMAT_VERSION, KV_COPY_FILE, MODEL_FILE, ModelConfig

log = logging.getLogger(__name__)

PROVIDERS = ("auto", "cuda", "cpu")
_CUDA = "CUDAExecutionProvider"


class ProviderError(RuntimeError):
    """The execution provider asked for cannot run this model here."""


def select_providers(provider: str) -> list[str]:
    available = ort.get_available_providers()
    if provider not in PROVIDERS:
        raise ValueError(f"provider {provider!r}: expected one of {', '.join(PROVIDERS)}")
    if provider == "cuda" and _CUDA not in available:
        raise ProviderError(
            f"--provider cuda: this onnxruntime offers only {', '.join(available)}; "
            "install onnxruntime-gpu (pip install 'textgen[gpu]')"
        )
    if provider in ("auto", "cuda") and _CUDA in available:
        # CUDA and cuDNN from pip's nvidia-* wheels (onnxruntime-gpu[cuda,cudnn]) are not on the
        # loader's path by themselves; a system-wide CUDA needs nothing and is left alone.
        if importlib.util.find_spec("nvidia") is not None and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        return [_CUDA, "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class Engine:
    """Prefill and one-token decode for rows that each own a slot of the KV cache."""

    def __init__(
        self,
        model_dir: Path,
        *,
        provider: str = "auto",
        threads: int | None = None,
        slots: int = 32,
        max_len: int | None = None,
        host_arrays: bool | None = None,
    ) -> None:
        """`slots` rows of `max_len` positions each (default: the model's max_total_tokens);
        `host_arrays` picks the KV store (kv_cache.KVCache; by default numpy on the CPU)."""
        self.config = ModelConfig.load(model_dir)
        missing = [name for name in (MODEL_FILE, KV_COPY_FILE) if not (model_dir / name).is_file()]
        if missing or self.config.format_version != FORMAT_VERSION:
            what = f"{', '.join(missing)} missing" if missing else f"format {self.config.format_version}"
            raise FileNotFoundError(
                f"{model_dir}: {what}; this server reads format {FORMAT_VERSION} (a KV cache allocated "
                "once): export it again (textgen-export ... --overwrite)"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or 0  # 0: ORT picks one per physical core
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Batch and chunk sizes change between steps; pattern planning would only be redone each time.
        options.enable_mem_pattern = False
        providers = select_providers(provider)
        self.session = ort.InferenceSession(
            str(model_dir / MODEL_FILE), sess_options=options, providers=providers
        )
        self.execution_provider = self.session.get_providers()[0]
        if provider == "cuda" and self.execution_provider != _CUDA:
            # onnxruntime falls back to the CPU when CUDA cannot start (driver, libraries): say so.
            raise ProviderError(
                f"--provider cuda: the session started on {self.execution_provider} instead; "
                "check the CUDA 13 / cuDNN 9 libraries and the driver (onnxruntime's log says why)"
            )
        self.device = "cuda" if self.execution_provider == _CUDA else "cpu"
        self.max_len = max_len or self.config.max_total_tokens
        self.cache = KVCache(
            model_dir,
            self.config,
            slots=slots,
            max_len=self.max_len,
            device=self.device,
            providers=self.session.get_providers(),
            host_arrays=host_arrays,
        )
        self.lora = LoraStacks(self.config, self.device) if self.config.lora is not None else None
        io = self.config.io
        layers = range(self.config.num_layers)
        self._past_names = [name for i in layers for name in (io.past_key.format(i), io.past_value.format(i))]
        self._present_names = [
            name for i in layers for name in (io.present_key.format(i), io.present_value.format(i))
        ]
        log.info(
            "loaded %s on %s (%s weights, %s activations, %d layers); KV cache %d slots x %d positions "
            "= %.1f MiB",
            self.config.name,
            self.execution_provider,
            self.config.weight_dtype,
            self.config.dtype,
            self.config.num_layers,
            slots,
            self.max_len,
            self.cache.nbytes / 2**20,
        )
        if self.lora is not None:
            log.info(
                "adapter slots: %d of rank up to %d (q/k/v/o and MLP), stacked weights %.1f MiB",
                self.lora.slots,
                self.lora.layout.rank,
                self.lora.nbytes / 2**20,
            )

    @property
    def slots(self) -> int:
        return self.cache.slots

    @property
    def adapter_slots(self) -> int:
        """Adapters the graph holds at once (slots 1..n; 0 is the base model); 0 without LoRA."""
        return self.lora.slots if self.lora is not None else 0

    def load_adapter(self, slot: int, weights: AdapterWeights | None) -> None:
        """Write an adapter into adapter slot `slot` (None clears it). Not while a pass runs, and not
        into a slot a running row uses: the scheduler calls this between steps."""
        if self.lora is None:
            raise ValueError(f"{self.config.name} was exported without adapter slots")
        self.lora.write(slot, weights)

    # -- forward passes -------------------------------------------------------------------------

    def prefill(
        self, slot: int, tokens: Sequence[int], start: int = 0, adapter: int = 0
    ) -> npt.NDArray[np.float32]:
        """Append `tokens` to the sequence in `slot`, which holds `start` positions, through adapter slot
        `adapter` (0: the base model); logits [vocab]."""
        if not tokens:
            raise ValueError("prefill needs at least one token")
        end = start + len(tokens)
        if start < 0 or end > self.max_len:
            raise ValueError(f"positions {start}..{end - 1} outside this cache's {self.max_len}")
        input_ids = np.asarray(tokens, dtype=np.int64).reshape(1, -1)  # [1, seq]
        seqlens = np.array([end - 1], dtype=np.int32)  # [1]
        adapters = np.array([adapter], dtype=np.int64)  # [1]
        logits: npt.NDArray[np.float32] = self._run(input_ids, seqlens, adapters, first_slot=slot)[0]
        return logits

    def decode(
        self,
        tokens: npt.NDArray[np.int64],
        lengths: npt.NDArray[np.int64],
        adapters: npt.NDArray[np.int64] | None = None,
    ) -> npt.NDArray[np.float32]:
        """One token per row for rows 0..n-1 (`tokens` [n]); `lengths` [n] are the positions each row
        already holds (its new token's position); `adapters` [n] each row's adapter slot (default: all
        the base model). Logits [n, vocab]."""
        n = int(tokens.shape[0])
        if lengths.shape != (n,) or int(lengths.max()) >= self.max_len:
            raise ValueError(f"lengths must be [{n}] and below {self.max_len}, got {lengths}")
        if adapters is None:
            adapters = np.zeros(n, dtype=np.int64)
        elif adapters.shape != (n,):
            raise ValueError(f"adapters must be [{n}], got {adapters.shape}")
        input_ids = tokens.astype(np.int64, copy=False).reshape(n, 1)  # [n, 1]
        return self._run(input_ids, lengths.astype(np.int32), adapters.astype(np.int64), first_slot=0)

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Move a sequence of `length` positions from slot `src` to slot `dst`."""
        self.cache.move(src, dst, length)

    def _run(
        self,
        input_ids: npt.NDArray[np.int64],
        seqlens: npt.NDArray[np.int32],
        adapters: npt.NDArray[np.int64],
        first_slot: int,
    ) -> npt.NDArray[np.float32]:
        io = self.config.io
        rows = int(input_ids.shape[0])
        binding = self.session.io_binding()
        binding.bind_cpu_input(io.input_ids, input_ids)
        if self.lora is not None:
            # Out-of-range indices would make Gather fail (CPU) or read anything (CUDA): refuse here.
            if int(adapters.min()) < 0 or int(adapters.max()) > self.lora.slots:
                raise ValueError(f"adapter slots must be in 0..{self.lora.slots}, got {adapters.tolist()}")
            # Bind only the range of slots in use (the graph's adapter work grows with it; none when
            # every row is the base model), each row's index relative to the range (0: the base model).
            used = adapters[adapters > 0]
            first = int(used.min()) if used.size else 1
            count = int(used.max()) - first + 1 if used.size else 0
            relative = np.where(adapters > 0, adapters - first + 1, 0).astype(np.int64)  # [rows]
            binding.bind_cpu_input(io.lora_index, relative)
            self.lora.bind(binding, first, count)
        elif adapters.any():
            raise ValueError(f"{self.config.name} was exported without adapter slots")
        binding.bind_cpu_input(io.seqlens_k, seqlens)
        # Host memory on every provider: CUDA's kernel reads it on the host.
        binding.bind_cpu_input(io.total_sequence_length, np.array(int(seqlens.max()) + 1, dtype=np.int32))
        self.cache.bind(binding, self._past_names, self._present_names, first_slot, rows)
        binding.bind_output(io.logits, "cpu")
        self.session.run_with_iobinding(binding)
        logits = np.asarray(binding.get_outputs()[-1].numpy())  # [rows, 1, vocab]; presents come first
        last: npt.NDArray[np.float32] = logits[:, -1, :].astype(np.float32, copy=False)  # [rows, vocab]
        return last

    @property
    def threads(self) -> int:
        return self.session.get_session_options().intra_op_num_threads or (os.cpu_count() or 1)
