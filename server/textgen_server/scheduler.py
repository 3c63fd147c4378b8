"""Continuous batching: one loop admits, prefills, decodes and retires sequences between passes.

The loop runs in its own thread (ONNX Runtime releases the GIL while it computes) and talks to
the asyncio server through the hand-offs of handles.py: `submit` queues a request and returns a
handle whose events arrive on the submitting event loop; this module never touches asyncio itself.

Every sequence owns a slot of the engine's KV cache (kv_cache.py). Running sequences sit in slots
0..n-1, so that one decode pass binds the first n slots; a sequence whose prompt is being prefilled
sits just above them. Each iteration:
1. retire cancelled sequences (a client that left stops costing anything within one step);
2. prefill, within this step's prefill budget: first the rest of a prompt left over from the last
   step, then new requests in arrival order while slots are free. A prompt longer than the budget
   is prefilled in chunks over several steps, so running streams keep getting tokens meanwhile;
   a prompt whose prefill completes gets its first token from the prefill logits and joins the
   running sequences;
3. retire the finished, cancelled and failed: the last running sequence's cache moves into each gap
   (one slot copy per leaver; no other row's cache is touched);
4. decode every running sequence in one forward pass, emit each new token, retire the finished.

A pass that fails fails only the requests whose own work it was: a prefill pass holds one prompt,
and when a decode pass fails, its rows are decoded again in two halves, each in a pass of its own
over its slots, and a half that fails again in halves, down to a row alone, so that only a row
whose own pass fails too ends (out of memory for the whole batch costs two passes, not one a row;
a row whose own work fails, about log2(n) more); out of memory in a
request's own pass is `PassOutOfMemoryError` (RESOURCE_EXHAUSTED), anything else a bug (INTERNAL).
A batch whose pass failed is not tried whole again for `BATCH_PASS_RETRY_SECONDS` while it keeps at
least as many rows (out of memory at a batch size fails again at every step): its steps go straight
to the halves, and the whole batch is tried again once that time is up or it has fewer rows.

A slot a sequence leaves keeps its keys and values (prefix_cache.py): a new prompt that starts with
the same tokens, through the same adapter (a chat's next turn, a shared system prompt), takes those
positions from it and prefills only the rest. A leaver in a gap that the last running sequence fills
is first copied into a free slot (one holding nothing, else the least recently used), if any is free.

The prefill budget is `prefill_chunk_tokens` while sequences are decoding (it bounds the stall
every stream sees) and `max_batch_prefill_tokens` when none is. A prompt's first token goes out as
its prefill ends, not after the step's other prompts; so in a step that began idle, a request that
arrives once a first token has gone out gets only what is left of `prefill_chunk_tokens` (its
client may be the one that got that token, and that stream waits on the prefill like any other).
At most one prompt is ever part-way through its prefill: later requests wait for it (first come,
first served).

LoRA adapters (adapters.py): a request that names one is admitted once its adapter sits in one of
the graph's adapter slots; until then it stays queued while the adapter is read on the loader thread,
and later requests that can run go first. When every adapter slot is in use by running rows, the
request waits for one to free, and only requests for the base model pass it meanwhile (so that the
slots do drain). Loaded adapters are written into the engine at the start of a step, never during a
pass, and each row passes its adapter slot to every forward pass.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .adapters import AdapterRegistry, AdapterSlots, unknown_adapter_message
from .engine import Engine
from .generation import Generation, GenerationRequest
from .grammar import prefetch_token_masks
from .handles import END, Outbox, RequestHandle
from .prefix_cache import PrefixCache
from .repeated_failure import RepeatedFailureLog
from .tokenizer import Tokenizer
from .validation import UnknownAdapterError

log = logging.getLogger(__name__)
FloatArray = npt.NDArray[np.float32]

# After a batch's decode pass failed, batches at least as large go straight to their halves for this
# long: a pass out of memory at a batch size, which fails at every step, is tried once a second,
# not once a step (memory other work held may free again).
BATCH_PASS_RETRY_SECONDS = 1.0


@dataclass(frozen=True)
class SchedulerLimits:
    max_batch_size: int = 32  # sequences in the batch: KV slots
    max_batch_prefill_tokens: int = 8192  # prompt tokens per step when nothing is decoding
    max_batch_total_tokens: int = 65536  # KV positions in all (slots x positions per slot)
    max_concurrent_requests: int = 128  # open requests: running, queued, or sending their output
    prefill_chunk_tokens: int = 512  # prompt tokens per step while sequences are decoding

    def kv_slots(self, max_len: int) -> int:
        """How many sequences of up to `max_len` positions the KV budget holds, up to the batch size."""
        return min(self.max_batch_size, self.max_batch_total_tokens // max_len)

    def largest_prefill_pass(self, device: str) -> int:
        """The most prompt tokens one forward pass takes on `device` ("cpu" or "cuda").

        On the CPU, prefill_chunk_tokens even when nothing decodes (a step then runs several passes
        up to max_batch_prefill_tokens): a pass there is bound by arithmetic well below that size, so
        cutting a prompt costs no time, while the memory a pass needs grows with it (onnxruntime's
        arena keeps it). A 3072-token prompt on Mistral-7B's layer shapes (`python -m
        bench.prefill_passes`: two and four layers of its widths, int4 and fp32, 2 threads of a
        Xeon) took 0.94-0.99x the time in passes of 512 that it took in one, and the process grew by
        0.65-0.69 GiB instead of 1.45-1.54 GiB, whatever the number of layers. On CUDA, where a
        larger pass uses the device better, max_batch_prefill_tokens.
        """
        if device == "cpu":
            return min(self.prefill_chunk_tokens, self.max_batch_prefill_tokens)
        return self.max_batch_prefill_tokens


class QueueFullError(Exception):
    """Too many requests running and queued; the client should back off (RESOURCE_EXHAUSTED)."""


class ShuttingDownError(Exception):
    """The server is draining; the request was not (or not completely) served (UNAVAILABLE)."""


class RequestTooLargeError(Exception):
    """The request could never fit this server's batch limits: INVALID_ARGUMENT naming `field`."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


class GenerationFailedError(Exception):
    """A forward pass failed: a bug, reported as INTERNAL with the request id."""


class PassOutOfMemoryError(GenerationFailedError):
    """A request's own pass (its prompt's prefill, or its row decoded alone after a batch's pass
    failed) could not get the memory it needs (RESOURCE_EXHAUSTED): the streams beside it went on,
    and the same request may succeed later, or with a shorter prompt."""


def _out_of_memory(error: Exception) -> bool:
    """Whether a pass failed for want of memory: onnxruntime's arena (BFCArena, the CPU's and CUDA's)
    says "Failed to allocate memory for requested buffer of size N", unchanged since 1.9."""
    return isinstance(error, MemoryError) or "Failed to allocate memory" in str(error)


@dataclass
class StepStats:
    """What the metrics exporter reads after each iteration."""

    queue_size: int = 0
    batch_size: int = 0
    kv_positions: int = 0  # the most KV positions in use during this step (its slots' lengths)
    prefill_positions: int = 0  # prompt tokens prefilled this step
    reused_positions: int = 0  # prompt tokens taken from the prefix cache this step (not prefilled)
    tokens: int = 0  # tokens generated this step
    first_token_seconds: list[float] = field(default_factory=list)  # submit → first token, this step
    finished: list[str] = field(default_factory=list)  # finish reasons ("stop", "length") this step
    # (method, cause) of each forward pass that raised this step: "prefill", "decode", "decode_part"
    # (part of a batch whose pass failed), or "decode_alone" (a row's own pass after the parts it was
    # in failed); "out_of_memory" or "error".
    failed_passes: list[tuple[str, str]] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    steps: int = 0


def _leaves(handle: RequestHandle) -> bool:
    """Whether a running sequence leaves the batch now: finished, cancelled, or failed on its own."""
    return handle.generation.finished or handle.cancelled.is_set() or handle.failed


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        limits: SchedulerLimits | None = None,
        on_step: Callable[[StepStats], None] | None = None,
        adapters: AdapterRegistry | None = None,
        prefix_cache: bool = True,
    ) -> None:
        """`prefix_cache`: free slots keep the positions of the sequences that left them, for later
        prompts that start the same way (prefix_cache.py)."""
        self.engine = engine
        self.adapters = adapters
        self.adapter_slots = (
            AdapterSlots(engine.adapter_slots, adapters.load, on_loaded=self._wake_up)
            if adapters is not None and engine.adapter_slots
            else None
        )
        self.tokenizer = tokenizer
        self.limits = limits or SchedulerLimits()
        self.slots = min(self.limits.max_batch_size, engine.slots)
        self._largest_pass = self.limits.largest_prefill_pass(engine.device)
        self.stats = StepStats()
        self._on_step = on_step
        self._lock = threading.Condition()
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._running: list[RequestHandle] = []  # running[i] owns slot i
        self._prefilling: RequestHandle | None = None  # part-way through its prompt, above the running
        # Submitted, and neither read to the end nor cancelled: what max_concurrent_requests bounds.
        # A finished request whose client has not read its events yet still counts.
        self._open: set[RequestHandle] = set()
        self.prefix_cache = PrefixCache() if prefix_cache else None
        self._outbox = Outbox()
        # A batch's decode pass out of memory fails again every step it stays that large.
        self._batch_decode_failures = RepeatedFailureLog(log)
        # The fewest rows whose batch pass failed, and until when batches that large skip it.
        self._failed_batch_rows: int | None = None
        self._batch_retry_at = 0.0
        self._accepting = True
        self._stopped = False
        self._drain_ended = threading.Event()  # `stop` stops waiting for what runs (a second signal)
        self._woken = False  # something changed since the loop last found nothing to do
        self._thread = threading.Thread(target=self._loop, name="textgen-scheduler", daemon=True)

    # -- the server's side ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request; raises QueueFullError, ShuttingDownError, or RequestTooLargeError."""
        max_len = self.engine.max_len
        # The last token generated is never fed back: it needs no position of its own.
        if request.max_total_tokens - 1 > max_len:
            raise RequestTooLargeError(
                "max_tokens",
                f"{len(request.prompt_ids)} input tokens + max_tokens {request.max_new_tokens} exceed the "
                f"{max_len} positions of this server's KV slots",
            )
        adapter = None
        if request.lora is not None:
            adapter = self.adapters.get(request.lora) if self.adapter_slots and self.adapters else None
            if adapter is None:  # removed since the request was validated, or no adapter slots
                known = self.adapters.names() if self.adapter_slots and self.adapters else ()
                raise UnknownAdapterError(unknown_adapter_message(request.lora, known))
        # Built here, on the caller's thread: a bad request fails alone, never inside a batch step.
        generation = Generation(request, self.tokenizer, self.engine.config.vocab_size)
        handle = RequestHandle.on_running_loop(generation, adapter)
        limits = self.limits
        with self._lock:
            if not self._accepting:
                raise ShuttingDownError("the server is shutting down; retry on another replica")
            if len(self._open) >= limits.max_concurrent_requests:
                raise QueueFullError(
                    f"{len(self._open)} requests are open (running, queued, or still sending their "
                    f"output), the limit is max_concurrent_requests={limits.max_concurrent_requests}; "
                    "retry later"
                )
            self._open.add(handle)
            handle.release = self._release_place
            self._waiting.append(handle)
            self._woken = True
            self._lock.notify()
        return handle

    def _release_place(self, handle: RequestHandle) -> None:
        """Its client read its last event or left: it no longer counts under max_concurrent_requests."""
        with self._lock:
            self._open.discard(handle)

    def _forget_cancelled_waiting(self) -> None:
        """Drop queued requests whose client has gone (call with the lock held).

        Nobody reads their events any more; left in the queue until a slot frees up, they would count
        in the queue gauge and be admitted only to be retired.
        """
        if any(handle.cancelled.is_set() for handle in self._waiting):
            self._waiting = collections.deque(h for h in self._waiting if not h.cancelled.is_set())

    @property
    def running_count(self) -> int:
        return len(self._running) + (self._prefilling is not None)

    @property
    def queued_count(self) -> int:
        return len(self._waiting)

    @property
    def kv_positions(self) -> int:
        """KV positions in use now: the lengths of every occupied slot."""
        prefilling = self._prefilling.cached if self._prefilling is not None else 0
        return sum(h.cached for h in self._running) + prefilling

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False

    def stop(self, drain_timeout: float) -> None:
        """Finish what runs within `drain_timeout` seconds (or until `end_drain`); tell every other
        client why it ends."""
        self.stop_accepting()
        deadline = time.monotonic() + drain_timeout
        while (self._waiting or self._running or self._prefilling) and time.monotonic() < deadline:
            if self._drain_ended.wait(0.01):
                break
        with self._lock:
            self._stopped = True
            self._lock.notify()
        self._thread.join(timeout=10)
        if self.adapter_slots is not None:
            self.adapter_slots.close()
        error = ShuttingDownError("the server shut down before this request finished")
        for handle in [*self._waiting, *self._running, *([self._prefilling] if self._prefilling else [])]:
            self._outbox.put(handle, error)
        self._outbox.flush()
        self._waiting.clear()
        self._running.clear()
        self._prefilling = None

    def end_drain(self) -> None:
        """Make a `stop` under way end what still runs now, instead of waiting out its timeout."""
        self._drain_ended.set()

    # -- the loop -----------------------------------------------------------------------------------

    def _wake_up(self) -> None:
        """Another thread changed something the loop waits for (an adapter finished loading)."""
        with self._lock:
            self._woken = True
            self._lock.notify()

    def _loop(self) -> None:
        idle = False
        while True:
            with self._lock:
                if idle and not self._woken and not self._stopped:
                    # Every waiting request waits for an adapter to load: sleep until one is loaded or
                    # a request comes (at most a moment, so that cancelled requests leave the queue).
                    self._lock.wait(timeout=0.5)
                while not self._stopped and not self._waiting and not self._running and not self._prefilling:
                    self._lock.wait()
                self._woken = False
                if self._stopped:
                    return
            try:
                idle = not self._iteration()
            except Exception:  # a bug in a forward pass must not take the server down
                failed = [*self._running, *([self._prefilling] if self._prefilling else [])]
                log.exception(
                    "generation step failed for requests %s", [h.request.request_id for h in failed]
                )
                for handle in failed:
                    self._fail(handle)
                self._running, self._prefilling = [], None
                if self.prefix_cache is not None:
                    self.prefix_cache.clear()  # a pass failed part-way: no slot's contents are trusted
                self._publish_stats(kv_peak=0)
                self._outbox.flush()

    def _iteration(self) -> bool:
        """One step; False when it found nothing it could do (everything waits for adapters).

        A step that decoded counts as work even when every row left after it: the queued requests
        can take the freed slots at once, and the loop must not sleep on them.
        """
        self.stats.prefill_seconds = self.stats.decode_seconds = 0.0
        self.stats.prefill_positions = self.stats.reused_positions = self.stats.tokens = 0
        self.stats.first_token_seconds, self.stats.finished, self.stats.failed_passes = [], [], []
        installed = self._install_adapters()
        self._retire(lambda handle: handle.cancelled.is_set())
        with self._lock:
            self._forget_cancelled_waiting()
        started = time.monotonic()
        self._prefill()
        if self.stats.prefill_positions or self.stats.failed_passes:  # only a step that ran a prefill
            self.stats.prefill_seconds = time.monotonic() - started  # pass is a sample of one
        kv_peak = self.kv_positions
        if self.stats.prefill_positions:
            self._outbox.flush()  # a failed prompt's error goes out now, not after this step's decode
        # Finished on their first token, or cancelled during the prefill (no first token was chosen):
        # either way they must not be decoded.
        self._retire(_leaves)
        decoded = bool(self._running)
        if decoded:
            started = time.monotonic()
            rows = self._running
            tokens = np.array([h.generation.last_token for h in rows], dtype=np.int64)  # [n]
            lengths = np.array([h.cached for h in rows], dtype=np.int64)  # [n] positions held
            adapters = (  # [n] 0: base model; None on a graph without adapter slots
                np.array([h.adapter_slot for h in rows], dtype=np.int64)
                if self.engine.adapter_slots
                else None
            )
            prefetch_token_masks(h.generation for h in rows)  # constrained rows, during the pass
            logits = self._decode_batch(rows, tokens, lengths, adapters)
            self.stats.decode_seconds = time.monotonic() - started
            for row, handle in enumerate(rows):
                row_logits = logits[row]
                if row_logits is None:
                    continue  # its own pass failed too: it has failed
                handle.cached += 1
                handle.fed_tokens.append(int(tokens[row]))
                self._emit(handle, row_logits)
            kv_peak = max(kv_peak, self.kv_positions)
            self._retire(_leaves)
        self.stats.steps += 1
        self._publish_stats(kv_peak)
        # After the observer: by the time a client sees its last token, the step is in the metrics.
        self._outbox.flush()
        return bool(installed or self.stats.prefill_positions or decoded)

    def _prefill(self) -> None:
        """Spend this step's prefill budget, in passes of at most `_largest_pass` tokens: the prompt
        part-way through first, then new requests."""
        limits = self.limits
        budget = limits.prefill_chunk_tokens if self._running else limits.max_batch_prefill_tokens
        spent = 0
        first_token_sent: float | None = None  # when this step's first first token went out
        while budget > 0:
            handle = self._prefilling
            if handle is None:
                handle = self._admit()
                if handle is None:
                    return
                if first_token_sent is not None and handle.submitted > first_token_sent:
                    # Sent after a first token of this step went out, maybe by the client that got it:
                    # the streams begun wait on its prefill as on any other, so the chunk bounds it.
                    budget = min(budget, limits.prefill_chunk_tokens - spent)
                self._reuse_prefix(handle)
            self._prefilling = handle
            if budget <= 0:
                return  # it comes first next step
            prompt = handle.request.prompt_ids
            chunk = prompt[handle.cached : handle.cached + min(budget, self._largest_pass)]
            budget -= len(chunk)
            spent += len(chunk)
            try:
                logits = self.engine.prefill(
                    handle.slot, chunk, start=handle.cached, adapter=handle.adapter_slot
                )  # [vocab]
            except Exception as exc:
                # This prompt's own pass (out of memory, say), which wrote its own slot only: the
                # request fails alone, its slot is free again and the prefix cache keeps nothing of it.
                log.exception("prefill pass failed for request %s", handle.request.request_id)
                self._prefilling = None
                self._fail_own_pass(handle, "prefill", exc, "prefilling the prompt", len(prompt))
                continue
            handle.cached += len(chunk)
            self.stats.prefill_positions += len(chunk)
            if handle.cached < len(prompt):
                continue  # its next pass, if the budget has room; else it comes first next step
            self._prefilling = None
            self._join(handle)
            self._emit(handle, logits)
            # Its first token goes out now, not once this step's other prompts are in: of 16 prompts
            # sent together, the first would otherwise wait for all 16. (Timed before: its client
            # may answer before this thread runs again.)
            if first_token_sent is None:
                first_token_sent = time.monotonic()
            self._outbox.flush()

    def _decode_batch(
        self,
        rows: list[RequestHandle],
        tokens: npt.NDArray[np.int64],
        lengths: npt.NDArray[np.int64],
        adapters: npt.NDArray[np.int64] | None,
    ) -> FloatArray | list[FloatArray | None]:
        """Every running row's next logits [n, vocab], in one pass, or in parts where that pass fails
        or failed not long ago at this many rows or fewer (`_decode_in_halves`)."""
        failed = self._failed_batch_rows
        if failed is not None and len(rows) >= failed and time.monotonic() < self._batch_retry_at:
            return self._decode_in_halves(rows, tokens)
        try:
            # A view of the engine's buffer: every row's token is picked before the next pass.
            logits: FloatArray = self.engine.decode(tokens, lengths, adapters, copy=False)  # [n, vocab]
        except Exception as exc:  # noqa: BLE001 - logged with its traceback, repeats summed up
            self._batch_decode_failures.failed(
                f"decode pass of {len(rows)} rows failed; decoding its rows in parts", exc
            )
            self._count_failed_pass("decode", exc)
            self._failed_batch_rows = min(len(rows), failed or len(rows))
            self._batch_retry_at = time.monotonic() + BATCH_PASS_RETRY_SECONDS
            return self._decode_in_halves(rows, tokens)
        self._batch_decode_failures.passed("the batch's decode pass")
        if failed is not None and len(rows) >= failed:
            self._failed_batch_rows = None  # as large a batch passes again
        return logits

    def _decode_in_halves(
        self, rows: list[RequestHandle], tokens: npt.NDArray[np.int64]
    ) -> list[FloatArray | None]:
        """After a decode pass of `rows` (consecutive slots, as every running row sits) failed: each
        half in a pass of its own (a batch of one: its row's pass once more, alone). Each row's logits
        [vocab], None where it failed. A failed pass wrote only its rows' slots, at the positions
        rewritten here."""
        if len(rows) == 1:
            return self._decode_part(rows, tokens)
        half = len(rows) // 2
        return [
            *self._decode_part(rows[:half], tokens[:half]),
            *self._decode_part(rows[half:], tokens[half:]),
        ]

    def _decode_part(
        self, rows: list[RequestHandle], tokens: npt.NDArray[np.int64]
    ) -> list[FloatArray | None]:
        """Part of a failed batch in a pass of its own over its slots; where that fails, its halves,
        down to a row alone, whose failure is its request's. As `_decode_in_halves` returns."""
        try:
            logits = self.engine.decode_slots(
                rows[0].slot,
                tokens,
                np.array([h.cached for h in rows], dtype=np.int64),  # [k]
                np.array([h.adapter_slot for h in rows], dtype=np.int64),  # [k]
            )  # [k, vocab]
        except Exception as exc:
            if len(rows) > 1:
                self._count_failed_pass("decode_part", exc)
                return self._decode_in_halves(rows, tokens)
            handle = rows[0]
            log.exception("decode pass failed for request %s", handle.request.request_id)
            self._fail_own_pass(handle, "decode_alone", exc, "decoding", handle.cached + 1)
            return [None]
        return list(logits)

    def _count_failed_pass(self, method: str, error: Exception) -> bool:
        """Count a pass that raised in this step's stats; whether it ran out of memory."""
        out_of_memory = _out_of_memory(error)
        self.stats.failed_passes.append((method, "out_of_memory" if out_of_memory else "error"))
        return out_of_memory

    def _fail_own_pass(
        self, handle: RequestHandle, method: str, error: Exception, doing: str, positions: int
    ) -> None:
        """A pass that held `handle`'s work alone raised: it fails, told so where that was for want
        of memory (RESOURCE_EXHAUSTED), with the generic failure (INTERNAL) otherwise."""
        if not self._count_failed_pass(method, error):
            self._fail(handle)
            return
        self._fail(
            handle,
            PassOutOfMemoryError(
                f"out of memory {doing} (request {handle.request.request_id}, {positions} tokens); "
                "retry later, or with a shorter prompt"
            ),
        )

    def _admit(self) -> RequestHandle | None:
        """The next queued request that can run, given the free KV slot just above the running ones
        (and its adapter's slot); None if none can."""
        if len(self._running) >= self.slots:
            return None
        with self._lock:
            for handle in [h for h in self._waiting if h.cancelled.is_set()]:
                self._waiting.remove(handle)
                self._outbox.put(handle, END)
            blocked = False  # an earlier request waits for an adapter slot to free: only base ones pass
            for handle in self._waiting:
                if handle.adapter is not None:
                    if blocked or self.adapter_slots is None:
                        continue
                    if self.adapters is not None:
                        # A rescan replaced its file while it waited: it runs wholly on the new version
                        # (the old one's weights and cached prompts must not meet the new file).
                        handle.adapter = self.adapters.current(handle.adapter)
                    placement = self.adapter_slots.place(handle.adapter, self._adapter_slots_in_use())
                    if placement.slot is None:
                        blocked = blocked or placement.waiting_for_slot
                        continue
                    handle.adapter_slot = placement.slot
                self._waiting.remove(handle)
                handle.slot, handle.cached = len(self._running), 0
                handle.admitted = time.monotonic()
                return handle
        return None

    def _in_slots(self) -> list[RequestHandle]:
        """The sequences that hold a KV slot: the running ones and the one part-way through its prompt."""
        return [*self._running, self._prefilling] if self._prefilling is not None else list(self._running)

    def _free_slots(self) -> set[int]:
        """The slots no running or prefilling sequence holds."""
        return set(range(self.slots)) - {h.slot for h in self._in_slots()}

    def _reuse_prefix(self, handle: RequestHandle) -> None:
        """Start a newly admitted sequence from the free slot sharing the longest prefix with its prompt
        (copied into its own slot if it is another); its slot holds nothing reusable from now on."""
        cache = self.prefix_cache
        if cache is None:
            return
        hit = cache.match(handle.request.prompt_ids, handle.adapter, self._free_slots(), prefer=handle.slot)
        if hit is None:
            self._vacate(handle.slot, busy=set())
        else:
            source, positions = hit
            if source != handle.slot:
                self._vacate(handle.slot, busy={source})
                self.engine.move_slot(source, handle.slot, positions)
            handle.cached = positions
            self.stats.reused_positions += positions
        cache.forget(handle.slot)

    def _vacate(self, slot: int, busy: set[int]) -> None:
        """Before free slot `slot` is written: copy what it holds into another free slot (not in
        `busy`) that holds nothing or something used less recently, or let it go."""
        cache = self.prefix_cache
        if cache is None or not cache.holds(slot):
            return
        refuge = cache.refuge(slot, self._free_slots() - busy - {slot})
        if refuge is None:
            cache.forget(slot)
            return
        self.engine.move_slot(slot, refuge, cache.positions(slot))
        cache.moved(slot, refuge)

    def _keep_prefixes(self, leaving: list[RequestHandle], kept_slots: int) -> None:
        """Hand the leavers' positions to the prefix cache before their slots are reused: in place for
        those at or above `kept_slots` (which the running sequences leave alone), copied into a free
        slot for those in a gap that the last running sequence is about to fill."""
        cache = self.prefix_cache
        if cache is None:
            return
        spare_slots = self._free_slots()  # the slots free before these leave
        for handle in leaving:
            if handle.failed or handle.cached == 0:
                continue  # its own work failed: keep nothing of it
            slot = handle.slot
            if slot < kept_slots:
                spare = cache.spare(spare_slots)
                if spare is None:
                    continue
                spare_slots.discard(spare)
                self.engine.move_slot(slot, spare, handle.cached)
                slot = spare
            tokens = [*handle.request.prompt_ids, *handle.fed_tokens][: handle.cached]
            cache.hold(slot, tokens, handle.adapter)

    def _adapter_slots_in_use(self) -> set[int]:
        return {h.adapter_slot for h in self._in_slots()}

    def _install_adapters(self) -> bool:
        """Write adapters that finished loading into the engine (between passes); fail the requests
        waiting for one that could not be loaded. True if anything changed."""
        if self.adapter_slots is None:
            return False
        loads = self.adapter_slots.loads
        failed = self.adapter_slots.install(self.engine.load_adapter)
        for adapter, error in failed:
            log.error("adapter %s could not be loaded from %s: %s", adapter.name, adapter.path, error)
            if self.adapters is not None:
                self.adapters.forget(adapter)  # its file changed or went away: no longer served
            with self._lock:
                waiting = [h for h in self._waiting if h.adapter is adapter]
                for handle in waiting:
                    self._waiting.remove(handle)
                    self._outbox.put(
                        handle,
                        # The reason stays in the log: it names the server's files.
                        UnknownAdapterError(
                            f"lora: adapter {adapter.name!r} could not be loaded; it is no longer served"
                        ),
                    )
        return bool(failed) or self.adapter_slots.loads != loads

    def _join(self, handle: RequestHandle) -> None:
        """A sequence whose prompt is in its slot joins the running ones, in the next slot."""
        slot = len(self._running)
        if handle.slot != slot:  # running sequences left while it was prefilling
            self._vacate(slot, busy={handle.slot})
            self.engine.move_slot(handle.slot, slot, handle.cached)
            handle.slot = slot
        self._running.append(handle)

    def _publish_stats(self, kv_peak: int) -> None:
        self.stats.kv_positions = kv_peak
        self.stats.batch_size = len(self._running)
        self.stats.queue_size = len(self._waiting)
        if self._on_step is not None:
            try:
                self._on_step(self.stats)
            except Exception:  # an observer's bug must not fail the requests in the batch
                log.exception("step observer failed")

    def _emit(self, handle: RequestHandle, logits: np.ndarray) -> None:
        if handle.cancelled.is_set() or handle.failed:
            return
        try:
            event = handle.generation.step(logits)
        except Exception:  # this row's own work (sampling, detokenizing, stop strings) failed
            log.exception("request %s failed in its own step", handle.request.request_id)
            self._fail(handle)
            return
        self._outbox.put(handle, event)
        self.stats.tokens += 1
        if event.completion_tokens == 1:
            self.stats.first_token_seconds.append(time.monotonic() - handle.submitted)
        if event.finish_reason is not None:
            self.stats.finished.append(event.finish_reason.value)
            self._outbox.put(handle, END)

    def _fail(self, handle: RequestHandle, error: GenerationFailedError | None = None) -> None:
        handle.failed = True
        self._outbox.put(
            handle, error or GenerationFailedError(f"generation failed (request {handle.request.request_id})")
        )

    def _retire(self, done: Callable[[RequestHandle], bool]) -> None:
        """Drop the sequences `done` says; fill each gap in the slots with the last running sequence."""
        prefilling = self._prefilling
        if prefilling is not None and done(prefilling):
            self._keep_prefixes([prefilling], kept_slots=0)  # above every running sequence
            self._prefilling = None
            self._close(prefilling)
        leaving = [h for h in self._running if done(h)]
        if not leaving:
            return
        for handle in leaving:
            self._close(handle)
        kept = [h for h in self._running if not done(h)]
        n = len(kept)
        self._keep_prefixes(leaving, kept_slots=n)
        gaps = iter(sorted(h.slot for h in leaving if h.slot < n))
        for handle in kept:
            if handle.slot >= n:  # above the new end: into a slot a leaver freed
                slot = next(gaps)
                self.engine.move_slot(handle.slot, slot, handle.cached)
                handle.slot = slot
        self._running = sorted(kept, key=lambda h: h.slot)

    def _close(self, handle: RequestHandle) -> None:
        if not handle.generation.finished and not handle.failed:
            self._outbox.put(handle, END)  # cancelled: the client is gone, close its stream quietly
