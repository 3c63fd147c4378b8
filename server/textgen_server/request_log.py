"""What one Generate/GenerateStream call did, recorded as it runs: its id, adapter, token counts,
timings and final status. The per-request metrics and the one log line per request both read it.

The log line is logfmt (`key=value`, on the `textgen_server.requests` logger) and never holds the
prompt or the generated text: ids, counts, milliseconds and codes only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import grpc

from .generation import TokenEvent

log = logging.getLogger("textgen_server.requests")

CANCELLED_CODES = frozenset({grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED})
"""The client left (it cancelled, or its deadline passed): neither a success nor a server failure."""
_SERVER_FAULTS = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})


@dataclass
class RequestRecord:
    """Times are time.monotonic() seconds; None where the request never got that far."""

    method: str
    started: float = field(default_factory=time.monotonic)
    request_id: str = ""
    adapter: str | None = None
    prompt_tokens: int = 0
    max_new_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    submitted: float | None = None  # validated and handed to the scheduler
    admitted: float | None = None  # its prefill began
    first_token: float | None = None
    last_token: float | None = None
    ended: float | None = None
    code: grpc.StatusCode = grpc.StatusCode.OK

    def add_token(self, event: TokenEvent) -> None:
        now = time.monotonic()
        if self.first_token is None:
            self.first_token = now
        self.last_token = now
        self.completion_tokens = event.completion_tokens
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason.value

    @property
    def succeeded(self) -> bool:
        return self.code == grpc.StatusCode.OK

    @property
    def cancelled(self) -> bool:
        return self.code in CANCELLED_CODES

    # -- durations in seconds (None when a bound is missing) -----------------------------------

    @property
    def duration(self) -> float | None:
        """End to end: from the call's arrival to its end."""
        return _between(self.started, self.ended)

    @property
    def validation_duration(self) -> float | None:
        return _between(self.started, self.submitted)

    @property
    def queue_duration(self) -> float | None:
        return _between(self.submitted, self.admitted)

    @property
    def inference_duration(self) -> float | None:
        """From the start of its prefill to its last token."""
        return _between(self.admitted, self.last_token)

    @property
    def time_to_first_token(self) -> float | None:
        return _between(self.started, self.first_token)

    @property
    def mean_time_per_token(self) -> float | None:
        """Mean time between output tokens (the first token's wait is time_to_first_token)."""
        decode = _between(self.first_token, self.last_token)
        if decode is None or self.completion_tokens < 2:
            return None
        return decode / (self.completion_tokens - 1)

    def log_line(self) -> str:
        fields: dict[str, object] = {
            "id": self.request_id or "-",
            "method": self.method,
            "status": self.code.name,
            "finish_reason": self.finish_reason or "-",
            "adapter": self.adapter or "-",
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "max_new_tokens": self.max_new_tokens,
            "duration_ms": _ms(self.duration),
            "queue_ms": _ms(self.queue_duration),
            "ttft_ms": _ms(self.time_to_first_token),
            "tpot_ms": _ms(self.mean_time_per_token),
        }
        return " ".join(f"{key}={value}" for key, value in fields.items())


def log_request(record: RequestRecord) -> None:
    """The request's one log line: WARNING for a server fault (INTERNAL, UNKNOWN), else INFO."""
    level = logging.WARNING if record.code in _SERVER_FAULTS else logging.INFO
    log.log(level, "request %s", record.log_line())


def _between(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else max(0.0, end - start)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"
