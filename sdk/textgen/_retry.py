"""When to retry a call, and how long to wait first: the one policy both clients use.

Retried, up to `max_retries` times, only while nothing has reached the caller:
- UNAVAILABLE: no connection, a replica that went away, or a server loading or draining; the
  request was not served, and with several replicas the next attempt goes to another one;
- RESOURCE_EXHAUSTED when the server says when to come back: a textgen server whose queue is full
  sends gRPC's retry pushback (`grpc-retry-pushback-ms`), and the wait is that, at most
  MAX_PUSHBACK. Without that hint RESOURCE_EXHAUSTED is final: it then means a message over a size
  limit, which fails the same way every time, or a server out of memory for this request's own
  pass, which the caller may retry later or with a shorter prompt.
A stream that has yielded a chunk is never retried: replaying it would deliver its start twice.
A pushback that is negative or not a number means "do not retry" (gRPC's retry design, A6).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable
from typing import Any, Final

import grpc

from ._exceptions import APIStatusError, error_from_rpc_error

__all__ = [
    "INITIAL_BACKOFF",
    "JITTER",
    "MAX_BACKOFF",
    "PUSHBACK_HEADER",
    "REQUEST_ID_HEADER",
    "RETRYABLE_CODES",
    "Attempts",
    "backoff",
    "pushback_ms",
    "retry_delay",
]

RETRYABLE_CODES: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
PUSHBACK_HEADER: Final = "grpc-retry-pushback-ms"
REQUEST_ID_HEADER: Final = "x-request-id"
INITIAL_BACKOFF: Final = 0.5
"""Seconds before the first retry (before jitter)."""
MAX_BACKOFF: Final = 8.0
"""Cap on the wait before any retry."""
MAX_PUSHBACK: Final = 60.0
"""Cap on a wait the server asks for."""
JITTER: Final = 0.25
"""The wait is shortened by a random fraction of at most this much."""


def backoff(
    retries_done: int,
    *,
    initial: float = INITIAL_BACKOFF,
    maximum: float = MAX_BACKOFF,
    jitter: float = JITTER,
    rng: random.Random | None = None,
) -> float:
    """Capped exponential backoff with jitter: min(initial * 2**retries_done, maximum), shortened
    by a random fraction in [0, jitter) so that clients that failed together do not retry together.
    The result lies in ((1 - jitter) * cap, cap]."""
    cap = min(initial * 2.0 ** min(retries_done, 64), maximum)
    fraction = (rng if rng is not None else random).random()
    return cap * (1.0 - jitter * fraction)


def pushback_ms(trailing_metadata: Iterable[Any] | None) -> str | None:
    """The server's retry pushback, as sent (None when it sent none). `trailing_metadata`: (key,
    value) pairs, as grpc and grpc.aio give them."""
    for key, value in trailing_metadata or ():
        if key == PUSHBACK_HEADER:
            return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return None


def retry_delay(
    code: grpc.StatusCode,
    retries_done: int,
    *,
    max_retries: int,
    yielded: bool = False,
    pushback: str | None = None,
    rng: random.Random | None = None,
) -> float | None:
    """Seconds to wait before retrying a call that ended with `code`, or None when it must not be
    retried: the code is not retryable (RESOURCE_EXHAUSTED without a `pushback`), `max_retries`
    retries were made, a stream already yielded a message, or the pushback says never."""
    if yielded or code not in RETRYABLE_CODES or retries_done >= max_retries:
        return None
    if pushback is None:
        return None if code == grpc.StatusCode.RESOURCE_EXHAUSTED else backoff(retries_done, rng=rng)
    try:
        milliseconds = int(pushback.strip())
    except ValueError:
        return None
    return None if milliseconds < 0 else min(milliseconds / 1000.0, MAX_PUSHBACK)


class Attempts:
    """The attempts of one call: the request id they share (sent as x-request-id, so the server
    logs them under it), their metadata, and whether, and after how long, to try again."""

    def __init__(self, max_retries: int, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.request_id = uuid.uuid4().hex
        self.metadata = ((REQUEST_ID_HEADER, self.request_id), *metadata)
        self.max_retries = max_retries
        self.retries_done = 0

    def delay_after(self, exc: grpc.RpcError, *, chunks_yielded: int = 0) -> float:
        """Seconds to wait before the next attempt after `exc`; raises the SDK's error for it when
        there is to be none."""
        code: grpc.StatusCode = exc.code()
        delay = retry_delay(
            code,
            self.retries_done,
            max_retries=self.max_retries,
            yielded=chunks_yielded > 0,
            pushback=pushback_ms(exc.trailing_metadata()),
        )
        if delay is None:
            raise self.error(exc, chunks_yielded) from exc
        self.retries_done += 1
        return delay

    def error(self, exc: grpc.RpcError, chunks_yielded: int = 0) -> APIStatusError:
        note = ""
        if chunks_yielded and exc.code() in RETRYABLE_CODES:
            # Say plainly why this one is not retried, unlike the same code before any text.
            chunks = f"{chunks_yielded} chunk{'s' if chunks_yielded > 1 else ''}"
            note = (
                f" (the stream broke after {chunks}; a stream that has yielded text is never "
                "retried, so as not to deliver it twice)"
            )
        return error_from_rpc_error(exc, request_id=self.request_id, note=note)
