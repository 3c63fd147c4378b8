"""When to retry a call, and how long to wait first: the one decision both clients use.

Only UNAVAILABLE is retried (no connection yet, or the server is loading or draining: the request
was not processed). A stream that has yielded a message is never retried: replaying it would
deliver the start of the text twice.
"""

from __future__ import annotations

import random
from typing import Final

import grpc

__all__ = ["INITIAL_BACKOFF", "JITTER", "MAX_BACKOFF", "RETRYABLE_CODES", "backoff", "retry_delay"]

RETRYABLE_CODES: Final = frozenset({grpc.StatusCode.UNAVAILABLE})
INITIAL_BACKOFF: Final = 0.5
"""Seconds before the first retry (before jitter)."""
MAX_BACKOFF: Final = 8.0
"""Cap on the wait before any retry."""
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


def retry_delay(
    code: grpc.StatusCode,
    retries_done: int,
    *,
    max_retries: int,
    yielded: bool = False,
    rng: random.Random | None = None,
) -> float | None:
    """Seconds to wait before retrying a call that ended with `code`, or None when it must not be
    retried: the code is not retryable, `max_retries` retries were already made, or (for a stream)
    a message was already yielded to the caller."""
    if yielded or code not in RETRYABLE_CODES or retries_done >= max_retries:
        return None
    return backoff(retries_done, rng=rng)
