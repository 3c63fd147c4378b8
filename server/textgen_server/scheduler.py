"""Continuous batching: one loop admits, steps and retires sequences between forward passes.

The loop runs in its own thread (ONNX Runtime releases the GIL while it computes) and talks to
the asyncio server through thread-safe hand-offs: `submit` queues a request and returns a handle
whose events arrive on the server's event loop.

Each iteration:
1. retire cancelled sequences (a client that left stops costing anything within one step);
2. admit queued requests while the prefill budget (rows x longest prompt, since the prefill batch
   is left-padded too), the batch size and the KV budget allow, and prefill them together; their
   first tokens are sampled from the prefill logits;
3. join them to the running batch (left padding, TGI's CausalLMBatch.concatenate);
4. decode every running sequence in one forward pass, emit each new token, retire the finished.

KV memory is bounded exactly: a left-padded batch is `rows x width` positions, its width is the
longest row, and no row grows past its prompt + max_new_tokens; admission keeps
rows x max(prompt + max_new_tokens) within `max_batch_total_tokens`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np

from .engine import Engine, KVBatch
from .generation import Generation, GenerationRequest, TokenEvent
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerLimits:
    max_batch_size: int = 32
    max_batch_prefill_tokens: int = 8192
    max_batch_total_tokens: int = 65536
    max_concurrent_requests: int = 128


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


@dataclass
class StepStats:
    """What the metrics exporter reads after each iteration."""

    queue_size: int = 0
    batch_size: int = 0
    kv_positions: int = 0  # rows x width of the running batch: what its KV cache holds
    prefill_positions: int = 0  # rows x width of this step's prefill (0 when nothing was admitted)
    tokens: int = 0  # tokens generated this step
    first_token_seconds: list[float] = field(default_factory=list)  # submit → first token, this step
    finished: list[str] = field(default_factory=list)  # finish reasons ("stop", "length") this step
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    steps: int = 0


_END = object()


class RequestHandle:
    """The server's view of one submitted request: an async stream of TokenEvents."""

    def __init__(self, generation: Generation, loop: asyncio.AbstractEventLoop) -> None:
        self.generation = generation
        self.submitted = time.monotonic()
        self._loop = loop
        self._events: asyncio.Queue[object] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.failed = False  # its own per-row work raised: it leaves the batch, the others go on

    @property
    def request(self) -> GenerationRequest:
        return self.generation.request

    def cancel(self) -> None:
        """Ask the scheduler to drop this request at its next step."""
        self.cancelled.set()

    async def events(self) -> AsyncIterator[TokenEvent]:
        while True:
            item = await self._events.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, TokenEvent)
            yield item


class _Outbox:
    """Events bound for the server's event loops, handed over in one call per loop.

    One wake-up of the event loop per batch step instead of one per token: at 16 sequences the
    per-token hand-offs cost the loop thread more than the tokens themselves.
    """

    def __init__(self) -> None:
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[object], object]]] = {}

    def put(self, handle: RequestHandle, item: object) -> None:
        self._pending.setdefault(handle._loop, []).append((handle._events, item))

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for loop, items in pending.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass


def _leaves(handle: RequestHandle) -> bool:
    """Whether a running sequence leaves the batch now: finished, cancelled, or failed on its own."""
    return handle.generation.finished or handle.cancelled.is_set() or handle.failed


def _deliver(items: list[tuple[asyncio.Queue[object], object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        limits: SchedulerLimits | None = None,
        on_step: Callable[[StepStats], None] | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.limits = limits or SchedulerLimits()
        self.stats = StepStats()
        self._on_step = on_step
        self._lock = threading.Condition()
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._running: list[RequestHandle] = []
        self._admitting: list[RequestHandle] = []  # taken from the queue, not yet in the batch
        self._outbox = _Outbox()
        self._batch: KVBatch | None = None
        self._accepting = True
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="textgen-scheduler", daemon=True)

    # -- the server's side ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request; raises QueueFullError, ShuttingDownError, or RequestTooLargeError."""
        limits = self.limits
        if request.max_total_tokens > limits.max_batch_total_tokens:
            raise RequestTooLargeError(
                "max_tokens",
                f"{len(request.prompt_ids)} input tokens + max_tokens {request.max_new_tokens} exceed this "
                f"server's max_batch_total_tokens={limits.max_batch_total_tokens}",
            )
        if len(request.prompt_ids) > limits.max_batch_prefill_tokens:
            raise RequestTooLargeError(
                "input",
                f"{len(request.prompt_ids)} input tokens exceed this server's "
                f"max_batch_prefill_tokens={limits.max_batch_prefill_tokens}",
            )
        # Built here, on the caller's thread: a bad request fails alone, never inside a batch step.
        generation = Generation(request, self.tokenizer, self.engine.config.vocab_size)
        handle = RequestHandle(generation, asyncio.get_running_loop())
        with self._lock:
            if not self._accepting:
                raise ShuttingDownError("the server is shutting down; retry on another replica")
            in_flight = len(self._waiting) + len(self._admitting) + len(self._running)
            if in_flight >= limits.max_concurrent_requests:
                raise QueueFullError(
                    f"{in_flight} requests are running or queued, the limit is "
                    f"max_concurrent_requests={limits.max_concurrent_requests}; retry later"
                )
            self._waiting.append(handle)
            self._lock.notify()
        return handle

    @property
    def running_count(self) -> int:
        return len(self._running)

    @property
    def queued_count(self) -> int:
        return len(self._waiting)

    @property
    def kv_positions(self) -> int:
        batch = self._batch
        return 0 if batch is None else batch.size * batch.width

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False

    def stop(self, drain_timeout: float) -> None:
        """Finish what runs within `drain_timeout` seconds; tell every other client why it ends."""
        self.stop_accepting()
        deadline = time.monotonic() + drain_timeout
        while (self._waiting or self._running) and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._lock:
            self._stopped = True
            self._lock.notify()
        self._thread.join(timeout=10)
        error = ShuttingDownError("the server shut down before this request finished")
        for handle in [*self._waiting, *self._admitting, *self._running]:
            self._outbox.put(handle, error)
        self._outbox.flush()
        self._waiting.clear()
        self._running.clear()

    # -- the loop -----------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopped and not self._waiting and not self._running:
                    self._lock.wait()
                if self._stopped:
                    return
            try:
                self._iteration()
            except Exception:  # a bug in a forward pass must not take the server down
                failed = [*self._admitting, *self._running]
                log.exception(
                    "generation step failed for requests %s", [h.request.request_id for h in failed]
                )
                for handle in failed:
                    self._fail(handle)
                self._admitting, self._running, self._batch = [], [], None
                self._publish_stats(kv_peak=0)
                self._outbox.flush()

    def _iteration(self) -> None:
        kv_peak = 0  # the most KV positions held at any point of this iteration
        self.stats.prefill_seconds = self.stats.decode_seconds = 0.0
        self.stats.prefill_positions = self.stats.tokens = 0
        self.stats.first_token_seconds, self.stats.finished = [], []
        self._retire(lambda handle: handle.cancelled.is_set())
        self._admitting = self._admit()
        if self._admitting:
            started = time.monotonic()
            batch, logits = self.engine.prefill([h.request.prompt_ids for h in self._admitting])
            self.stats.prefill_seconds = time.monotonic() - started
            self.stats.prefill_positions = batch.size * batch.width
            for row, handle in enumerate(self._admitting):
                self._emit(handle, logits[row])  # logits [batch, vocab]
            self._batch = batch if self._batch is None else self.engine.concatenate([self._batch, batch])
            self._running.extend(self._admitting)
            self._admitting = []
            self._outbox.flush()  # first tokens go out now, not after this step's decode
            kv_peak = self.kv_positions
            # Cancelled during the prefill: no first token was chosen, so it must not be decoded.
            self._retire(_leaves)
        if self._running and self._batch is not None:
            started = time.monotonic()
            tokens = np.array([h.generation.last_token for h in self._running], dtype=np.int64)  # [batch]
            logits = self.engine.decode(self._batch, tokens)
            self.stats.decode_seconds = time.monotonic() - started
            kv_peak = max(kv_peak, self.kv_positions)
            for row, handle in enumerate(self._running):
                self._emit(handle, logits[row])
            self._retire(_leaves)
        self.stats.steps += 1
        self._publish_stats(kv_peak)
        # After the observer: by the time a client sees its last token, the step is in the metrics.
        self._outbox.flush()

    def _publish_stats(self, kv_peak: int) -> None:
        self.stats.kv_positions = kv_peak
        self.stats.batch_size = len(self._running)
        self.stats.queue_size = len(self._waiting)
        if self._on_step is not None:
            try:
                self._on_step(self.stats)
            except Exception:  # an observer's bug must not fail the requests in the batch
                log.exception("step observer failed")

    def _admit(self) -> list[RequestHandle]:
        limits = self.limits
        admitted: list[RequestHandle] = []
        longest_prompt = 0  # a prefill batch is left-padded: it computes rows x longest prompt positions
        longest = max((h.request.max_total_tokens for h in self._running), default=0)
        with self._lock:
            while self._waiting:
                handle = self._waiting[0]
                if handle.cancelled.is_set():
                    self._outbox.put(self._waiting.popleft(), _END)
                    continue
                request = handle.request
                rows = len(self._running) + len(admitted) + 1
                widest = max(longest, request.max_total_tokens)
                if (
                    rows > limits.max_batch_size
                    or (len(admitted) + 1) * max(longest_prompt, len(request.prompt_ids))
                    > limits.max_batch_prefill_tokens
                    or rows * widest > limits.max_batch_total_tokens
                ):
                    break
                self._waiting.popleft()
                longest_prompt = max(longest_prompt, len(request.prompt_ids))
                longest = widest
                admitted.append(handle)
        return admitted

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
            self._outbox.put(handle, _END)

    def _fail(self, handle: RequestHandle) -> None:
        handle.failed = True
        self._outbox.put(
            handle, GenerationFailedError(f"generation failed (request {handle.request.request_id})")
        )

    def _retire(self, done: Callable[[RequestHandle], bool]) -> None:
        keep = [row for row, handle in enumerate(self._running) if not done(handle)]
        if len(keep) == len(self._running):
            return
        kept = set(keep)
        for row, handle in enumerate(self._running):
            if row not in kept and not handle.generation.finished and not handle.failed:
                self._outbox.put(handle, _END)  # cancelled: the client is gone, close its stream quietly
        self._running = [self._running[row] for row in keep]
        if not keep:
            self._batch = None
        elif self._batch is not None:
            self._batch = self.engine.filter(self._batch, keep)
