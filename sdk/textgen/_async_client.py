"""The asyncio client: Client's mirror on grpc.aio (tests/test_sdk_parity.py holds them to it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import grpc
import grpc.aio

from . import _retry
from ._client import CHANNEL_OPTIONS, _check_settings
from ._convert import (
    build_request,
    chunk_from_proto,
    completion_from_proto,
    model_info_from_proto,
    request_from_body,
)
from ._exceptions import error_from_rpc_error
from ._types import Chunk, Completion, Message, ModelInfo, Tool
from .v1 import textgen_pb2, textgen_pb2_grpc

__all__ = ["AsyncClient", "AsyncStream"]

if TYPE_CHECKING:
    from typing_extensions import Self

    from .v1.textgen_pb2_grpc import TextGenerationAsyncStub

_T = TypeVar("_T")


class AsyncStream(AsyncIterator[Chunk]):
    """The chunks of a streaming generation, as they arrive. Their `response` deltas concatenate
    to the full text; the last chunk carries `finish_reason` and `usage`. Errors (an
    APIStatusError) are raised from iteration. `await close()`, or leaving an `async with` block,
    cancels the call on the server."""

    def __init__(self, chunks: AsyncGenerator[Chunk, None]) -> None:
        self._chunks = chunks

    async def __anext__(self) -> Chunk:
        return await self._chunks.__anext__()

    def __aiter__(self) -> Self:
        return self

    async def close(self) -> None:
        """Stop the stream; the server stops generating."""
        await self._chunks.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


class AsyncClient:
    """An asyncio client of a textgen server; it mirrors Client method for method.

    `timeout` is the deadline in seconds of each attempt of a call (None: no deadline).
    UNAVAILABLE is retried up to `max_retries` times with capped exponential backoff and jitter;
    other errors are raised at once, and a stream is never retried once it has yielded a chunk.
    `credentials` (e.g. grpc.ssl_channel_credentials()) selects a TLS channel.
    Use it as an async context manager, or await close(), to close the channel. The channel opens
    on the first call, in the running event loop: use a client within one event loop.
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
        self._channel: grpc.aio.Channel | None = None
        self._stub: TextGenerationAsyncStub | None = None
        self._closed = False

    @overload
    async def generate(
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
    async def generate(
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
    ) -> AsyncStream: ...
    @overload
    async def generate(
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
    ) -> Completion | AsyncStream: ...
    async def generate(
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
    ) -> Completion | AsyncStream:
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
        return await self._generate(request, stream)

    @overload
    async def chat(
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
    async def chat(
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
    ) -> AsyncStream: ...
    @overload
    async def chat(
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
    ) -> Completion | AsyncStream: ...
    async def chat(
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
    ) -> Completion | AsyncStream:
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
        return await self._generate(request, stream)

    async def run(self, body: Mapping[str, Any]) -> Completion | AsyncStream:
        """Run a Workers AI request body as it is: {"prompt": ...} or {"messages": ...}, with any
        of the card's options. Returns an AsyncStream when the body says "stream": true, else a
        Completion. Raises InvalidRequestError for a body that is not one of the card's two forms."""
        request, stream = request_from_body(body)
        return await self._generate(request, stream)

    async def model_info(self) -> ModelInfo:
        """The served model: name, limits, dtype, execution provider and adapters."""
        response: textgen_pb2.GetModelInfoResponse = await self._with_retries(
            lambda: self._get_stub().GetModelInfo(textgen_pb2.GetModelInfoRequest(), timeout=self.timeout)
        )
        return model_info_from_proto(response)

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._closed = True
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def _get_stub(self) -> TextGenerationAsyncStub:
        """The stub; the channel opens on first use, in the running event loop (grpc.aio binds it)."""
        if self._closed:
            raise RuntimeError("the client is closed")
        if self._stub is None:
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
            else:
                self._channel = grpc.aio.secure_channel(
                    self.target, self._credentials, options=CHANNEL_OPTIONS
                )
            self._stub = textgen_pb2_grpc.TextGenerationStub(self._channel)
        return self._stub

    async def _generate(self, request: textgen_pb2.GenerateRequest, stream: bool) -> Completion | AsyncStream:
        if stream:
            return AsyncStream(self._stream_chunks(request))
        response: textgen_pb2.GenerateResponse = await self._with_retries(
            lambda: self._get_stub().Generate(request, timeout=self.timeout)
        )
        return completion_from_proto(response)

    async def _with_retries(self, call: Callable[[], Awaitable[_T]]) -> _T:
        retries = 0
        while True:
            try:
                return await call()
            except grpc.RpcError as exc:
                delay = _retry.retry_delay(exc.code(), retries, max_retries=self.max_retries)
                if delay is None:
                    raise error_from_rpc_error(exc) from exc
            await asyncio.sleep(delay)
            retries += 1

    async def _stream_chunks(self, request: textgen_pb2.GenerateRequest) -> AsyncGenerator[Chunk, None]:
        retries = 0
        while True:
            call = self._get_stub().GenerateStream(request, timeout=self.timeout)
            yielded = False
            try:
                async for message in call:
                    yielded = True
                    yield chunk_from_proto(message)
                return
            except grpc.RpcError as exc:
                delay = _retry.retry_delay(exc.code(), retries, max_retries=self.max_retries, yielded=yielded)
                if delay is None:
                    raise error_from_rpc_error(exc) from exc
            finally:
                call.cancel()  # no-op once the call has ended; stops the server when we stop early
            await asyncio.sleep(delay)
            retries += 1
