"""What Client and AsyncClient share: their settings, credentials and call metadata, and (through
`_retry.Attempts`) the retry policy. Requests are built in `_convert`; only the transport, grpc or
grpc.aio, sleeping or awaiting, is each client's own."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Final

import grpc

from ._channel import CHANNEL_OPTIONS, channel_target, check_target
from ._exceptions import RequestCancelledError
from ._retry import Attempts

__all__ = ["TOKEN_ENV", "BaseClient", "CallSlot"]

TOKEN_ENV: Final = "TEXTGEN_TOKEN"
"""The bearer token of clients made without `token`."""
MAX_TIMEOUT: Final = 1e9
"""The longest finite `timeout` in seconds (about 31 years): grpc ends a call whose deadline is
much further off at once, DEADLINE_EXCEEDED. `inf`, like None, sets no deadline."""


class BaseClient:
    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float | None,
        max_retries: int,
        credentials: grpc.ChannelCredentials | None,
        token: str | None,
    ) -> None:
        if timeout is not None and not 0 < timeout <= MAX_TIMEOUT and timeout != math.inf:
            raise ValueError(
                f"timeout must be positive and at most {MAX_TIMEOUT:g} seconds, or inf or None for no "
                f"deadline, not {timeout!r}"
            )
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, not {max_retries!r}")
        self.target = check_target(target)
        self.timeout = None if timeout == math.inf else timeout
        self.max_retries = max_retries
        self._credentials = credentials
        token = os.environ.get(TOKEN_ENV) if token is None else token
        self._auth_metadata = _auth_metadata(token)
        self._closed = False

    def _attempts(self) -> Attempts:
        """A new call's attempts: its request id, its metadata, its retry decisions."""
        return Attempts(self.max_retries, self._auth_metadata)

    def _channel_args(self) -> tuple[str, tuple[tuple[str, int | str], ...]]:
        """The gRPC target and options of the channel to open."""
        return channel_target(self.target), CHANNEL_OPTIONS

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the client is closed")

    def _closed_error(
        self, attempts: Attempts, slot: CallSlot | None, when: str
    ) -> RequestCancelledError | None:
        """The RequestCancelledError of a call whose client (or stream) was closed `when`; None while
        both are open."""
        if not (self._closed or (slot is not None and slot.closed)):
            return None
        what = "client" if self._closed else "stream"
        return RequestCancelledError(
            grpc.StatusCode.CANCELLED, f"the {what} was closed {when}", request_id=attempts.request_id
        )

    def _check_not_closed_while_waiting(self, attempts: Attempts, slot: CallSlot | None = None) -> None:
        """After the wait before a retry: if the client (or the stream) was closed meanwhile, the
        RequestCancelledError a call in flight gets when that happens, not a closed client's error."""
        error = self._closed_error(attempts, slot, "while the call waited to retry")
        if error is not None:
            raise error


class CallSlot:
    """The gRPC call of a stream's current attempt, shared by the stream and the generator that
    runs its attempts, so that the stream can cancel it without referring to the generator's frame
    (a reference cycle would leave an abandoned stream to the cyclic garbage collector)."""

    __slots__ = ("call", "closed")

    def __init__(self) -> None:
        self.call: Any = None
        self.closed = False  # the stream's close(): no attempt starts after it


def _auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    if not token:
        return ()
    token = token.strip()
    if not token.isprintable() or " " in token:
        raise ValueError("token must be one word of printable characters")
    return (("authorization", f"Bearer {token}"),)
