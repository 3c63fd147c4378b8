"""The hand-off between the scheduler's thread and the asyncio server: a request's handle, whose
events the server reads on its event loop, and the outbox that the scheduler fills during a step and
flushes to each loop in one thread-safe call."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable

from .adapters import Adapter
from .generation import Generation, GenerationRequest, TokenEvent

END = object()  # the last item of a handle's events: the stream ends cleanly


class RequestHandle:
    """The server's view of one submitted request: an async stream of TokenEvents."""

    def __init__(
        self, generation: Generation, loop: asyncio.AbstractEventLoop, adapter: Adapter | None = None
    ) -> None:
        self.generation = generation
        # The LoRA adapter version it runs with: the one it was accepted with, or the one a rescan
        # replaced it by before it was admitted (kept if the file goes away).
        self.adapter = adapter
        self.submitted = time.monotonic()
        self.admitted: float | None = None  # when its prefill began (per-request queue/inference times)
        self._loop = loop
        self._events: asyncio.Queue[object] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.failed = False  # its own per-row work raised: it leaves the batch, the others go on
        # The scheduler's bookkeeping: the KV slot it owns and how many positions it holds there.
        self.slot = -1
        self.cached = 0
        self.fed_tokens: list[int] = []  # generated tokens fed back by decode passes (after the prompt)
        self.adapter_slot = 0  # the graph's adapter slot its passes use; 0: the base model
        # The scheduler's: frees this request's place under max_concurrent_requests (idempotent).
        self.release: Callable[[RequestHandle], None] | None = None

    @classmethod
    def on_running_loop(cls, generation: Generation, adapter: Adapter | None = None) -> RequestHandle:
        """A handle whose events arrive on the event loop of the calling coroutine."""
        return cls(generation, asyncio.get_running_loop(), adapter)

    @property
    def request(self) -> GenerationRequest:
        return self.generation.request

    def cancel(self) -> None:
        """The client left, or the server is done with the request: the scheduler drops whatever work
        is left at its next step, and the request no longer counts under max_concurrent_requests."""
        self.cancelled.set()
        self._release()

    def _release(self) -> None:
        if self.release is not None:
            self.release(self)

    async def events(self) -> AsyncIterator[TokenEvent]:
        """The request's events up to its last. Reading that far frees its place: until then it counts
        under max_concurrent_requests even when its generation is over, since the events a client
        has not read (a stream it stopped reading) are memory this server still holds for it."""
        while True:
            item = await self._events.get()
            if item is END or isinstance(item, BaseException):
                self._release()
            if item is END:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, TokenEvent)
            yield item


class Outbox:
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


def _deliver(items: list[tuple[asyncio.Queue[object], object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
