"""The synchronous client. `_async_client.py` mirrors it method for method on grpc.aio."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar, overload

import grpc

from . import _retry
from ._convert import (
    build_request,
    chunk_from_proto,
    completion_from_proto,
    model_info_from_proto,
    request_from_body,
)
from ._exceptions import error_from_rpc_error
from ._types import Chunk, Completion, Message, ModelInfo, Tool
from ._version import __version__
from .v1 import textgen_pb2, textgen_pb2_grpc

__all__ = ["CHANNEL_OPTIONS", "Client", "Stream"]

if TYPE_CHECKING:
    from typing_extensions import Self

_T = TypeVar("_T")

CHANNEL_OPTIONS: Final[tuple[tuple[str, int | str], ...]] = (
    # Ping an idle connection every minute so a dead peer (or a NAT that dropped the flow) is
    # noticed within keepalive_timeout instead of at the next request. At most two pings go out
    # without data in between (the default), so servers with the default ping policy accept them.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.primary_user_agent", f"textgen-python/{__version__}"),
)
"""Options of every channel the clients open."""


class Stream(Iterator[Chunk]):
    """The chunks of a streaming generation, as they arrive. Their `response` deltas concatenate
    to the full text; the last chunk carries `finish_reason` and `usage`. Errors (an
    APIStatusError) are raised from iteration. `close()`, or leaving a `with` block, cancels the
    call on the server."""

    def __init__(self, chunks: Generator[Chunk, None, None]) -> None:
        self._chunks = chunks

    def __next__(self) -> Chunk:
        return next(self._chunks)

    def __iter__(self) -> Self:
        return self

    def close(self) -> None:
        """Stop the stream; the server stops generating."""
        self._chunks.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class Client:
    """A client of a textgen server.

    `timeout` is the deadline in seconds of each attempt of a call (None: no deadline).
    UNAVAILABLE is retried up to `max_retries` times with capped exponential backoff and jitter;
    other errors are raised at once, and a stream is never retried once it has yielded a chunk.
    `credentials` (e.g. grpc.ssl_channel_credentials()) selects a TLS channel.
    Use it as a context manager, or call close(), to close the channel.
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout: float | None = 60.0,
        max_retries: int = 2,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        _check_settings(timeout, max_retries)
        self.target = target
        self.timeout = timeout
        self.max_retries = max_retries
        self._credentials = credentials
        self._channel: grpc.Channel | None = None
        self._stub: textgen_pb2_grpc.TextGenerationStub | None = None
        self._closed = False
        self._lock = threading.Lock()  # a Client may be shared by threads; open one channel

    @overload
    def generate(
        self,
        prompt: str,
        *,
        raw: bool = False,
        lora: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        repetition_penalty: float | None = None,
        frequency_penalty: float | None = None,
        presence_penalty: float | None = None,
        stop: str | Sequence[str] | None = None,
        stream: Literal[False] = False,
    ) -> Completion: ...
    @overload
    def generate(
        self,
        prompt: str,
        *,
        raw: bool = False,
        lora: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        repetition_penalty: float | None = None,
        frequency_penalty: float | None = None,
        presence_penalty: float | None = None,
        stop: str | Sequence[str] | None = None,
        stream: Literal[True],
    ) -> Stream: ...
    @overload
    def generate(
        self,
        prompt: str,
        *,
        raw: bool = False,
        lora: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        repetition_penalty: float | None = None,
        frequency_penalty: float | None = None,
        presence_penalty: float | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool,
    ) -> Completion | Stream: ...
    def generate(
        self,
        prompt: str,
        *,
        raw: bool = False,
        lora: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        repetition_penalty: float | None = None,
        frequency_penalty: float | None = None,
        presence_penalty: float | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
    ) -> Completion | Stream:
        """Generate from a prompt (the card's prompt form). With raw=False the prompt is one user
        turn of the instruct format. Arguments left as None take the server's defaults."""
        request = build_request(
            prompt=prompt,
            raw=raw,
            lora=lora,
            stop=stop,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            repetition_penalty=repetition_penalty,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
        )
        return self._generate(request, stream)

    @overload
    def chat(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[Tool] | None = None,
        lora: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        repetition_penalty: float | None = None,
        frequency_penalty: float | None = None,
        presence_penalty: float | None = None,
        stop: str | Sequence[str] | None = None,
        stream: Literal[False] = False,
    ) -> Completion: ...
    @overload
    def chat(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[Tool] | None = None,
        lora: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        repetition_penalty: float | None = None,
        frequency_penalty: float | None = None,
        presence_penalty: float | None = None,
        stop: str | Sequence[str] | None = None,
        stream: Literal[True],
    ) -> Stream: ...
    @overload
    def chat(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[Tool] | None = None,
        lora: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        repetition_penalty: float | None = None,
        frequency_penalty: float | None = None,
        presence_penalty: float | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool,
    ) -> Completion | Stream: ...
    def chat(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[Tool] | None = None,
        lora: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        repetition_penalty: float | None = None,
        frequency_penalty: float | None = None,
        presence_penalty: float | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
    ) -> Completion | Stream:
        """Generate the next assistant turn of a conversation (the card's messages form), with
        the functions in `tools` on offer: the model's calls come back in `tool_calls`."""
        request = build_request(
            messages=messages,
            tools=tools,
            lora=lora,
            stop=stop,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            repetition_penalty=repetition_penalty,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
        )
        return self._generate(request, stream)

    def run(self, body: Mapping[str, Any]) -> Completion | Stream:
        """Run a Workers AI request body as it is: {"prompt": ...} or {"messages": ...}, with any
        of the card's options. Returns a Stream when the body says "stream": true, else a
        Completion. Raises InvalidRequestError for a body that is not one of the card's two forms."""
        request, stream = request_from_body(body)
        return self._generate(request, stream)

    def model_info(self) -> ModelInfo:
        """The served model: name, limits, dtype, execution provider and adapters."""
        response: textgen_pb2.GetModelInfoResponse = self._with_retries(
            lambda: self._get_stub().GetModelInfo(textgen_pb2.GetModelInfoRequest(), timeout=self.timeout)
        )
        return model_info_from_proto(response)

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        with self._lock:
            self._closed = True
            channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _get_stub(self) -> textgen_pb2_grpc.TextGenerationStub:
        """The stub, opening the channel on first use."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the client is closed")
            if self._stub is None:
                if self._credentials is None:
                    self._channel = grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS)
                else:
                    self._channel = grpc.secure_channel(
                        self.target, self._credentials, options=CHANNEL_OPTIONS
                    )
                self._stub = textgen_pb2_grpc.TextGenerationStub(self._channel)
            return self._stub

    def _generate(self, request: textgen_pb2.GenerateRequest, stream: bool) -> Completion | Stream:
        if stream:
            return Stream(self._stream_chunks(request))
        response: textgen_pb2.GenerateResponse = self._with_retries(
            lambda: self._get_stub().Generate(request, timeout=self.timeout)
        )
        return completion_from_proto(response)

    def _with_retries(self, call: Callable[[], _T]) -> _T:
        retries = 0
        while True:
            try:
                return call()
            except grpc.RpcError as exc:
                delay = _retry.retry_delay(exc.code(), retries, max_retries=self.max_retries)
                if delay is None:
                    raise error_from_rpc_error(exc) from exc
            time.sleep(delay)
            retries += 1

    def _stream_chunks(self, request: textgen_pb2.GenerateRequest) -> Generator[Chunk, None, None]:
        retries = 0
        while True:
            call = self._get_stub().GenerateStream(request, timeout=self.timeout)
            yielded = False
            try:
                for message in call:
                    yielded = True
                    yield chunk_from_proto(message)
                return
            except grpc.RpcError as exc:
                delay = _retry.retry_delay(exc.code(), retries, max_retries=self.max_retries, yielded=yielded)
                if delay is None:
                    raise error_from_rpc_error(exc) from exc
            finally:
                call.cancel()  # no-op once the call has ended; stops the server when we stop early
            time.sleep(delay)
            retries += 1


def _check_settings(timeout: float | None, max_retries: int) -> None:
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be positive or None, not {timeout!r}")
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, not {max_retries!r}")
