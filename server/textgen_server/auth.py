"""Bearer-token authentication: a grpc.aio server interceptor checking `authorization: Bearer <token>`.

Tokens come from a file, one per line (blank lines and `#` comments skipped), read at start and
again by `TokenFile.reload` (the server calls it on SIGHUP), so tokens rotate without a restart.
A token is compared with every known one in constant time: both sides are SHA-256 digests compared
with hmac.compare_digest, so neither a token's content nor its length leaks through timing.

Health checks are always open: load balancers and kubelet probes carry no token. Reflection
describes the whole API to whoever asks, so it sits behind the token unless `reflection_public`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
import grpc.aio

from .excerpt import excerpt

log = logging.getLogger(__name__)

MAX_LOGGED_METHOD = 100  # characters of a refused call's method quoted in the log

HEALTH_METHODS = "/grpc.health.v1.Health/"
REFLECTION_METHODS = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")
AUTHORIZATION_HEADER = "authorization"
_SCHEME = "bearer"  # case-insensitive (RFC 6750, section 2.1)


class TokenFileError(Exception):
    """The token file cannot be read or holds no token; the message names the file."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def read_token_digests(path: Path) -> frozenset[bytes]:
    """The SHA-256 digests of the tokens in `path`: one per line, blank lines and # comments skipped.
    A byte-order mark (Windows editors write one) is not part of the first line: with it, that line
    was '\ufeff# comment', a token, and a file holding only the mark held one."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"cannot read the token file {path}: {exc}") from exc
    tokens = [line.strip() for line in text.splitlines()]
    digests = frozenset(_digest(token) for token in tokens if token and not token.startswith("#"))
    if not digests:
        raise TokenFileError(f"the token file {path} holds no token (one per line)")
    return digests


class TokenFile:
    """The accepted tokens, as read from `path`; `reload` swaps in the file's current content."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._digests = read_token_digests(path)

    def __len__(self) -> int:
        return len(self._digests)

    def reload(self) -> bool:
        """Read the file again. A file that cannot be read or holds no token leaves the tokens as
        they were (an error is logged): a half-written file must not lock every client out."""
        try:
            digests = read_token_digests(self.path)
        except TokenFileError as exc:
            log.error("%s; keeping the %d tokens read before", exc, len(self._digests))
            return False
        self._digests = digests  # one assignment: a request sees the old set or the new one
        log.info("reloaded %d tokens from %s", len(digests), self.path)
        return True

    def accepts(self, token: str) -> bool:
        digest = _digest(token)
        matched = False
        for known in self._digests:  # no early exit: the time does not depend on which one matched
            matched |= hmac.compare_digest(digest, known)
        return matched


if TYPE_CHECKING:  # grpc's classes are generic in its type stubs only
    _Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
    _Continuation: TypeAlias = Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]]


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without a known bearer token with UNAUTHENTICATED, except health checks
    (and reflection when `reflection_public`). `on_refused(reason)` counts refusals."""

    def __init__(
        self,
        tokens: TokenFile,
        *,
        reflection_public: bool = False,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.tokens = tokens
        self._open = (HEALTH_METHODS, *REFLECTION_METHODS) if reflection_public else (HEALTH_METHODS,)
        self._on_refused = on_refused

    async def intercept_service(
        self, continuation: _Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> _Handler | None:
        method: str = handler_call_details.method
        if method.startswith(self._open):
            return await continuation(handler_call_details)
        reason = self._refusal(handler_call_details.invocation_metadata or ())
        if reason is None:
            return await continuation(handler_call_details)
        if self._on_refused is not None:
            self._on_refused("missing" if reason.startswith("missing") else "invalid")
        # The method is the client's :path, unchecked until routing: quoted and cut, so that no
        # caller without a token writes lines (or terminal escapes) into the log.
        log.info("refused %s: %s", excerpt(method, MAX_LOGGED_METHOD), reason)
        return _refusing_handler(await continuation(handler_call_details), reason)

    def _refusal(self, metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
        """None when the metadata carries an accepted token, else why not (never the token)."""
        values = [value for key, value in metadata if key == AUTHORIZATION_HEADER]
        if not values:
            return "missing bearer token: send the metadata 'authorization: Bearer <token>'"
        value = values[0]
        scheme, _, token = (value.decode(errors="replace") if isinstance(value, bytes) else value).partition(
            " "
        )
        if len(values) > 1 or scheme.lower() != _SCHEME or not token.strip():
            return "malformed authorization metadata: expected one 'authorization: Bearer <token>'"
        if not self.tokens.accepts(token.strip()):
            return "invalid bearer token"
        return None


def _refusing_handler(handler: _Handler | None, reason: str) -> _Handler:
    """A handler of the same kind as `handler` that ends the call with UNAUTHENTICATED. An unknown
    method is refused the same way: a caller without a token learns nothing about the API."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    request_streaming = handler is not None and handler.request_streaming
    response_streaming = handler is not None and handler.response_streaming
    if request_streaming and response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)
