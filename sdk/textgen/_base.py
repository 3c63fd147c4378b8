"""What Client and AsyncClient share: their settings, credentials and call metadata, and (through
`_retry.Attempts`) the retry policy. Requests are built in `_convert`; only the transport, grpc or
grpc.aio, sleeping or awaiting, is each client's own."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Final

import grpc

from ._channel import CHANNEL_OPTIONS, channel_target, check_target
from ._retry import Attempts

__all__ = ["TOKEN_ENV", "BaseClient", "CallSlot"]

TOKEN_ENV: Final = "TEXTGEN_TOKEN"
"""The bearer token of clients made without `token`."""


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
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be positive or None, not {timeout!r}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, not {max_retries!r}")
        self.target = check_target(target)
        self.timeout = timeout
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


class CallSlot:
    """The gRPC call of a stream's current attempt, shared by the stream and the generator that
    runs its attempts, so that the stream can cancel it without referring to the generator's frame
    (a reference cycle would leave an abandoned stream to the cyclic garbage collector)."""

    __slots__ = ("call",)

    def __init__(self) -> None:
        self.call: Any = None


def _auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    if not token:
        return ()
    token = token.strip()
    if not token.isprintable() or " " in token:
        raise ValueError("token must be one word of printable characters")
    return (("authorization", f"Bearer {token}"),)
