"""ONNX Runtime forward passes over a KV cache allocated once, a slot per running sequence.

The graph (textgen_export.native_graph) attends with GroupQueryAttention: each layer's past key and
value are a run of slots of the cache's buffers (kv_cache.py), bound as the presents too, so the op
writes new columns in place. A row's position is its own: `seqlens_k` says how long each row is, so
rows of any lengths decode together with no padding, and joining or leaving the batch moves no other
row's cache.

Three passes, the first two as in gpt-fast:
- `prefill(slot, tokens, start)`: one sequence, `tokens` appended at positions start.. of its slot
  (a whole prompt, or one chunk of a long one). One row per call: onnxruntime-gpu 1.31.1's
  GroupQueryAttention has no per-row query lengths, so several new tokens over an existing cache
  are only well defined for batch 1.
- `decode(tokens, lengths)`: one new token for each of rows 0..n-1, which sit in slots 0..n-1 (the
  scheduler keeps running rows in the first slots; `move_slot` fills the gap a leaving row leaves).
  A decode pass of n rows reuses the binding of the last one of n rows: the KV buffers never move,
  and the token, length and adapter inputs live in host arrays each pass overwrites. Binding every
  buffer anew cost 0.1-0.2 ms a step, a tenth of an int4 step on the bench model.
- `decode_slots(first_slot, tokens, lengths, adapters)`: one new token for each of k rows in the
  consecutive slots first_slot.., in a pass bound for it that writes only those slots: part of a
  batch whose `decode` failed (the scheduler retries such a batch in halves, down to a row alone).

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from .huge_pages import AVAILABLE as huge_pages_available
from .huge_pages import HUGE_PAGE, Collapsed, collapse, malloc_hint, resident_blocks
from .kv_cache import KVCache
from .lora_format import AdapterWeights
from .lora_stacks import LoraStacks
from .model_config import (
    CONFIG_FILE,
    FORMAT_VERSION,
    KV_COPY_FILE,
    LORA_MODULES,
    MODEL_FILE,
    OLDEST_READ_FORMAT,
    ModelConfig,
)

log = logging.getLogger(__name__)

PROVIDERS = ("auto", "cuda", "cpu")
_CUDA = "CUDAExecutionProvider"
# Threads that copy the host KV cache in a slot move: a handful fill a socket's memory bandwidth, and
# `threads` 0 (one per core) on a large host would otherwise start dozens.
MAX_COPY_THREADS = 8


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
        preload_cuda_libraries()
        return [_CUDA, "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from pip's nvidia-* wheels (onnxruntime-gpu[cuda,cudnn], or a PyTorch
    install's), which are not on the loader's path by themselves: without this a CUDA session
    cannot start. A system-wide CUDA needs nothing and is left alone."""
    if importlib.util.find_spec("nvidia") is not None and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


def session_options(threads: int | None) -> ort.SessionOptions:
    """The options the engine's session runs with (`threads` None or 0: one per physical core)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or 0  # 0: ORT picks one per physical core
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Batch and chunk sizes change between steps; pattern planning would only be redone each time.
    options.enable_mem_pattern = False
    return options


class ModelMismatchError(ValueError):
    """textgen.json describes another graph than model.onnx: every pass would fail."""


_ELEMENT_TYPES = {"fp32": "tensor(float)", "fp16": "tensor(float16)"}


def check_graph_matches(session: ort.InferenceSession, config: ModelConfig, config_path: Path) -> None:
    """textgen.json's numbers against the graph's inputs and outputs, at start-up: an edited or
    mismatched file would otherwise pass health checks and then fail every request."""
    io = config.io
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    problems: list[str] = []
    missing = [name for name in (io.input_ids, io.seqlens_k, io.total_sequence_length) if name not in inputs]
    missing += [io.logits] if io.logits not in outputs else []
    if missing:
        problems.append(f"io names {', '.join(missing)}, which the graph does not have")
    past = [io.past_key.format(i) for i in range(config.num_layers)]
    graph_layers = sum(
        1 for name in inputs if name.startswith(io.past_key.split("{")[0]) and name.endswith("key")
    )
    if graph_layers != config.num_layers or any(name not in inputs for name in past):
        problems.append(f"num_layers {config.num_layers}, the graph has {graph_layers}")
    elif past:
        cache = inputs[past[0]]  # [batch, kv_heads, max_len, head_dim]
        if cache.shape[1] != config.num_kv_heads:
            problems.append(f"num_kv_heads {config.num_kv_heads}, the graph has {cache.shape[1]}")
        if cache.shape[3] != config.head_dim:
            problems.append(f"head_dim {config.head_dim}, the graph has {cache.shape[3]}")
        if cache.type != _ELEMENT_TYPES.get(config.dtype):
            problems.append(f"dtype {config.dtype}, the graph's cache is {cache.type}")
    if (config.lora is not None) != (io.lora_index in inputs):
        has = "has" if io.lora_index in inputs else "has no"
        problems.append(
            f"lora {'set' if config.lora is not None else 'absent'}, the graph {has} adapter slots"
        )
    elif config.lora is not None and set(config.lora.modules) != set(LORA_MODULES):
        problems.append(
            f"lora modules {', '.join(sorted(config.lora.modules)) or '(none)'}, the graph's are {', '.join(LORA_MODULES)}"
        )
    elif config.lora is not None:
        # The groups say how adapters are packed into the graph's inputs (exports before the field
        # packed gate/up together): they must name the graph's inputs and hold every module once.
        prefix, suffix = io.lora_a.format(0, "\0").split("\0")
        graph_groups = {
            n[len(prefix) : -len(suffix)] for n in inputs if n.startswith(prefix) and n.endswith(suffix)
        }
        grouped = sorted(m for members in config.lora.groups.values() for m in members)
        if set(config.lora.groups) != graph_groups or grouped != sorted(LORA_MODULES):
            listed = ", ".join(
                f"{group} ({'/'.join(members)})" for group, members in config.lora.groups.items()
            )
            problems.append(f"lora groups {listed}, the graph's are {', '.join(sorted(graph_groups))}")
    if io.logits in outputs and outputs[io.logits].shape[-1] != config.vocab_size:
        problems.append(
            f"vocab_size {config.vocab_size}, the graph's logits have {outputs[io.logits].shape[-1]}"
        )
    if problems:
        raise ModelMismatchError(f"{config_path} does not match the graph beside it: {'; '.join(problems)}")


@dataclass
class _DecodeBinding:
    binding: ort.IOBinding
    logits: npt.NDArray[np.float32]  # [rows, vocab]: read-only view of the buffer the pass writes
    adapter_range: tuple[int, int] | None = None  # the adapter slots bound now (first, count)


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
        huge_pages: bool = True,
    ) -> None:
        """`slots` rows of `max_len` positions each (default: the model's max_total_tokens);
        `host_arrays` picks the KV store (kv_cache.KVCache; by default numpy on the CPU);
        `huge_pages`: on the CPU, move the loaded weights into 2 MiB pages (huge_pages.py)."""
        self.config = ModelConfig.load(model_dir)
        missing = [name for name in (MODEL_FILE, KV_COPY_FILE) if not (model_dir / name).is_file()]
        if self.config.format_version > FORMAT_VERSION:
            raise ValueError(
                f"{model_dir}: format {self.config.format_version}, written by a newer textgen; this server "
                f"reads format {FORMAT_VERSION}: upgrade the server, or export the model with this version"
            )
        if missing or self.config.format_version < OLDEST_READ_FORMAT:
            what = f"{', '.join(missing)} missing" if missing else f"format {self.config.format_version}"
            raise FileNotFoundError(
                f"{model_dir}: {what}; this server reads formats {OLDEST_READ_FORMAT} to {FORMAT_VERSION} "
                "(a KV cache allocated once): export it again (textgen-export ... --overwrite)"
            )
        providers = select_providers(provider)
        self.session = ort.InferenceSession(
            str(model_dir / MODEL_FILE), sess_options=session_options(threads), providers=providers
        )
        check_graph_matches(self.session, self.config, model_dir / CONFIG_FILE)
        self.execution_provider = self.session.get_providers()[0]
        if provider == "cuda" and self.execution_provider != _CUDA:
            # onnxruntime falls back to the CPU when CUDA cannot start (driver, libraries): say so.
            raise ProviderError(
                f"--provider cuda: the session started on {self.execution_provider} instead; "
                "check the CUDA 13 / cuDNN 9 libraries and the driver (onnxruntime's log says why)"
            )
        self.device = "cuda" if self.execution_provider == _CUDA else "cpu"
        # On the CPU every step reads the weights the session just loaded: into huge pages with them.
        self.huge_pages: Collapsed | None = None  # None: not tried (off, weights on the GPU, no 2 MiB pages)
        if self.device == "cpu" and huge_pages:
            if not huge_pages_available:
                log.info(
                    "host memory: left in the kernel's pages (2 MiB pages need Linux and 4 KiB base pages)"
                )
            else:
                resident = resident_blocks()
                log.info("host memory: moving %.0f MiB into 2 MiB pages", len(resident) * HUGE_PAGE / 2**20)
                self.huge_pages = collapse(resident)
                log.info("host memory: %s", self.huge_pages.describe())
                hint = malloc_hint(self.huge_pages, os.environ.get("GLIBC_TUNABLES", ""))
                if hint is not None:
                    log.info("host memory: %s", hint)
        if self.device == "cuda" and self.config.dtype == "fp32":
            # onnxruntime-gpu registers GroupQueryAttention for fp16 and bf16 only (onnxruntime-genai's
            # builder writes MultiHeadAttention for fp32 on CUDA instead): ORT runs it on the CPU.
            log.warning(
                "%s has fp32 activations: onnxruntime-gpu's GroupQueryAttention has fp16 and bf16 kernels "
                "only, so attention runs on the CPU and every pass copies the bound KV slots to the host "
                "and back; export with --dtype fp16 (or --activations fp16) to serve on CUDA",
                self.config.name,
            )
        self.max_len = max_len or self.config.max_total_tokens
        self.cache = KVCache(
            model_dir,
            self.config,
            slots=slots,
            max_len=self.max_len,
            device=self.device,
            providers=self.session.get_providers(),
            host_arrays=host_arrays,
            copy_threads=min(self.threads, MAX_COPY_THREADS),
        )
        self.lora = LoraStacks(self.config, self.device) if self.config.lora is not None else None
        # A decode pass reuses one binding per row count (_bind_decode): its inputs live in these host
        # arrays, which each pass overwrites, so no buffer is bound again step after step.
        self._step_ids = np.zeros((slots, 1), dtype=np.int64)  # [slots, 1]
        self._step_seqlens = np.zeros(slots, dtype=np.int32)  # [slots]: each row's length - 1
        self._step_total = np.zeros((), dtype=np.int32)  # []: the longest row's length
        self._step_adapters = np.zeros(slots, dtype=np.int64)  # [slots]: adapter index in the bound run
        # The decode passes' logits land here (bound once per row count): a binding whose output is
        # bound anew each pass cost about 60 µs a step more, a few percent of a one-row step.
        vocab = self.config.vocab_size
        self._step_logits = np.empty((slots, 1, vocab), dtype=np.float32)  # [slots, 1, vocab]
        self._decode_bindings: dict[int, _DecodeBinding] = {}
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
        *,
        copy: bool = True,
    ) -> npt.NDArray[np.float32]:
        """One token per row for rows 0..n-1 (`tokens` [n]); `lengths` [n] are the positions each row
        already holds (its new token's position); `adapters` [n] each row's adapter slot (default: all
        the base model). Logits [n, vocab], an array of their own; with `copy=False` a read-only view
        of the buffer the pass wrote them into, which the next decode pass overwrites (for a caller
        done with them by then: copying 16 rows of a 32000-token vocabulary cost 0.15-0.3 ms a step)."""
        # Every Python operation between two passes runs on caches the pass just swept (a fp32 pass
        # reads all the weights): each costs several times its usual time, so this path does few.
        n = int(tokens.shape[0])
        if not 1 <= n <= self.slots:
            raise ValueError(f"decode takes 1 to {self.slots} rows, got {n}")
        longest = max(lengths.tolist()) if lengths.shape == (n,) else self.max_len  # no numpy reduction
        if longest >= self.max_len:
            raise ValueError(f"lengths must be [{n}] and below {self.max_len}, got {lengths}")
        bound = self._decode_bindings.get(n) or self._bind_decode(n)
        if adapters is not None or self.lora is not None:
            if adapters is None:
                adapters = np.zeros(n, dtype=np.int64)
            elif adapters.shape != (n,):
                raise ValueError(f"adapters must be [{n}], got {adapters.shape}")
            adapter_run = self._adapter_range(adapters)
            if adapter_run is not None and self.lora is not None:
                first, count, relative = adapter_run
                self._step_adapters[:n] = relative
                if bound.adapter_range != (first, count):
                    self.lora.bind(bound.binding, first, count)
                    bound.adapter_range = (first, count)
        self._step_ids[:n, 0] = tokens
        self._step_seqlens[:n] = lengths
        self._step_total[...] = longest + 1
        self.session.run_with_iobinding(bound.binding)
        if copy:  # the next pass overwrites the buffer, and callers may keep the array they got
            return bound.logits.copy()
        return bound.logits

    def decode_slots(
        self,
        first_slot: int,
        tokens: npt.NDArray[np.int64],
        lengths: npt.NDArray[np.int64],
        adapters: npt.NDArray[np.int64],
    ) -> npt.NDArray[np.float32]:
        """One token per row for the k rows in slots `first_slot`..`first_slot + k - 1` (`tokens`,
        `lengths`, `adapters` [k], as for `decode`), in a pass bound for itself that writes only those
        slots: part of a batch whose `decode` pass failed. Logits [k, vocab], an array of their own."""
        k = int(tokens.shape[0])
        if k < 1 or first_slot < 0 or first_slot + k > self.slots:
            raise ValueError(f"slots {first_slot}..{first_slot + k - 1} outside this cache's {self.slots}")
        if lengths.shape != (k,) or adapters.shape != (k,) or int(lengths.max()) >= self.max_len:
            raise ValueError(f"lengths and adapters must be [{k}], lengths below {self.max_len}")
        input_ids = tokens.astype(np.int64, copy=False).reshape(k, 1)  # [k, 1]
        return self._run(input_ids, lengths.astype(np.int32), adapters, first_slot=first_slot)

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Move a sequence of `length` positions from slot `src` to slot `dst`."""
        self.cache.move(src, dst, length)

    def _bind_decode(self, rows: int) -> _DecodeBinding:
        """The binding every decode pass of `rows` rows reuses: slots 0..rows-1 of the KV buffers as
        inputs and outputs, and the first `rows` entries of the step's host arrays (logits included),
        which each pass overwrites."""
        io = self.config.io
        binding = self.session.io_binding()
        binding.bind_input(io.input_ids, "cpu", 0, np.int64, [rows, 1], self._step_ids.ctypes.data)
        binding.bind_input(io.seqlens_k, "cpu", 0, np.int32, [rows], self._step_seqlens.ctypes.data)
        # Host memory on every provider: CUDA's kernel reads it on the host.
        binding.bind_input(io.total_sequence_length, "cpu", 0, np.int32, [], self._step_total.ctypes.data)
        if self.lora is not None:
            binding.bind_input(io.lora_index, "cpu", 0, np.int64, [rows], self._step_adapters.ctypes.data)
        self.cache.bind(binding, self._past_names, self._present_names, 0, rows)
        # Host memory on every provider: the logits are read on the host.
        logits_shape = [rows, *self._step_logits.shape[1:]]  # [rows, 1, vocab]
        binding.bind_output(io.logits, "cpu", 0, np.float32, logits_shape, self._step_logits.ctypes.data)
        logits = self._step_logits[:rows, 0, :]  # [rows, vocab], a view of the bound buffer
        logits.flags.writeable = False
        bound = self._decode_bindings[rows] = _DecodeBinding(binding, logits)
        return bound

    def _adapter_range(
        self, adapters: npt.NDArray[np.int64]
    ) -> tuple[int, int, npt.NDArray[np.int64]] | None:
        """The run of adapter slots the rows use (first, count; count 0 when every row is the base
        model) and each row's index relative to it (0: the base model): a pass binds only that run,
        since the graph's adapter work grows with it. None for a graph without adapter slots, which
        takes only rows of the base model."""
        if self.lora is None:
            if adapters.any():
                raise ValueError(f"{self.config.name} was exported without adapter slots")
            return None
        # Out-of-range indices would make Gather fail (CPU) or read anything (CUDA): refuse here.
        if int(adapters.min()) < 0 or int(adapters.max()) > self.lora.slots:
            raise ValueError(f"adapter slots must be in 0..{self.lora.slots}, got {adapters.tolist()}")
        used = adapters[adapters > 0]
        first = int(used.min()) if used.size else 1
        count = int(used.max()) - first + 1 if used.size else 0
        relative = np.where(adapters > 0, adapters - first + 1, 0).astype(np.int64)  # [rows]
        return first, count, relative

    def _run(
        self,
        input_ids: npt.NDArray[np.int64],
        seqlens: npt.NDArray[np.int32],
        adapters: npt.NDArray[np.int64],
        first_slot: int,
    ) -> npt.NDArray[np.float32]:
        """One pass bound for itself (prefill: its slot and length change from call to call); its logits
        [rows, vocab], at the last position of each row."""
        io = self.config.io
        rows = int(input_ids.shape[0])
        binding = self.session.io_binding()
        binding.bind_cpu_input(io.input_ids, input_ids)
        adapter_run = self._adapter_range(adapters)
        if adapter_run is not None and self.lora is not None:
            first, count, relative = adapter_run
            binding.bind_cpu_input(io.lora_index, relative)
            self.lora.bind(binding, first, count)
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
