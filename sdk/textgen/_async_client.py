"""The asyncio client: Client's mirror on grpc.aio (tests/test_sdk_parity.py holds them to it);
what they share (settings, metadata, retry policy) is in `_base.py`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import grpc
import grpc.aio

from ._base import BaseClient, CallSlot
from ._convert import (
    build_request,
    chunk_from_proto,
    completion_from_proto,
    model_info_from_proto,
    request_from_body,
)
from ._retry import Attempts
from ._types import Chunk, Completion, FlatTool, Message, ModelInfo, ResponseFormat, Tool, ToolChoice
from .v1 import textgen_pb2, textgen_pb2_grpc

__all__ = ["AsyncClient", "AsyncStream"]

if TYPE_CHECKING:
    from typing_extensions import Self

    from .v1.textgen_pb2_grpc import TextGenerationAsyncStub

_T = TypeVar("_T")
_Metadata = tuple[tuple[str, str], ...]


class AsyncStream(AsyncIterator[Chunk]):
    """The chunks of a streaming generation, as they arrive. Their `response` deltas concatenate
    to the full text; the last chunk carries `finish_reason` and `usage`. Errors (an
    APIStatusError) are raised from iteration. `await close()`, or leaving an `async with` block,
    cancels the call on the server; so does dropping the stream unfinished (once it is
    garbage-collected), but use `async with` to stop the server at once. `request_id` is the
    x-request-id of the call."""

    def __init__(self, chunks: AsyncGenerator[Chunk, None], request_id: str, slot: CallSlot) -> None:
        self._chunks = chunks
        self._slot = slot
        self._loop = asyncio.get_running_loop()
        self.request_id = request_id

    async def __anext__(self) -> Chunk:
        return await self._chunks.__anext__()

    def __aiter__(self) -> Self:
        return self

    async def close(self) -> None:
        """Stop the stream; the server stops generating. From another task than the one iterating
        (a cancel button, a watchdog), that task's iteration raises RequestCancelledError."""
        self._slot.closed = True
        call = self._slot.call
        if call is not None:
            call.cancel()
        try:
            await self._chunks.aclose()
        except RuntimeError:  # "aclose(): asynchronous generator is already running": the cancel ends it
            pass

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def __del__(self) -> None:
        call = self._slot.call
        if call is not None and not self._loop.is_closed():
            # grpc.aio calls belong to their loop; the collector may run on any thread.
            self._loop.call_soon_threadsafe(call.cancel)


class AsyncClient(BaseClient):
    """An asyncio client of a textgen server; it mirrors Client method for method (and takes the
    same targets, credentials, token and retry settings: see Client).

    Use it as an async context manager, or await close(), to close the channel. The channel opens
    on the first call, in the running event loop: use a client within one event loop.
    """

    def __init__(
        self,
        target: str | Sequence[str] = "localhost:50051",
        *,
        timeout: float | None = 60.0,
        max_retries: int = 2,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        super().__init__(
            target, timeout=timeout, max_retries=max_retries, credentials=credentials, token=token
        )
        self._channel: grpc.aio.Channel | None = None
        self._stub: TextGenerationAsyncStub | None = None

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
        response_format: ResponseFormat | None = None,
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
        response_format: ResponseFormat | None = None,
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
        response_format: ResponseFormat | None = None,
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
        response_format: ResponseFormat | None = None,
        stream: bool = False,
    ) -> Completion | AsyncStream:
        """Generate from a prompt (the card's prompt form). With raw=False the prompt is one user
        turn of the instruct format. Arguments left as None take the server's defaults.
        `response_format` ({"type": "json_schema", "json_schema": {...}} or {"type": "json_object"})
        constrains the response to JSON."""
        request = build_request(
            prompt=prompt,
            raw=raw,
            lora=lora,
            stop=stop,
            response_format=response_format,
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
        tools: Sequence[Tool | FlatTool] | None = None,
        tool_choice: ToolChoice | None = None,
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
        response_format: ResponseFormat | None = None,
        stream: Literal[False] = False,
    ) -> Completion: ...
    @overload
    async def chat(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[Tool | FlatTool] | None = None,
        tool_choice: ToolChoice | None = None,
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
        response_format: ResponseFormat | None = None,
        stream: Literal[True],
    ) -> AsyncStream: ...
    @overload
    async def chat(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[Tool | FlatTool] | None = None,
        tool_choice: ToolChoice | None = None,
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
        response_format: ResponseFormat | None = None,
        stream: bool,
    ) -> Completion | AsyncStream: ...
    async def chat(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[Tool | FlatTool] | None = None,
        tool_choice: ToolChoice | None = None,
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
        response_format: ResponseFormat | None = None,
        stream: bool = False,
    ) -> Completion | AsyncStream:
        """Generate the next assistant turn of a conversation (the card's messages form), with
        the functions in `tools` on offer (the card's form or the flat one): the model's calls
        come back in `tool_calls`, their arguments valid for the tool's `parameters`. `tool_choice`:
        "auto" (text or calls, the default), "none", "required", or a function's name."""
        request = build_request(
            messages=messages,
            tools=tools,
            tool_choice=tool_choice,
            lora=lora,
            stop=stop,
            response_format=response_format,
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
        response: textgen_pb2.GetModelInfoResponse
        response, _ = await self._with_retries(
            lambda metadata: self._get_stub().GetModelInfo(
                textgen_pb2.GetModelInfoRequest(), timeout=self.timeout, metadata=metadata
            )
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
        self._check_open()
        if self._stub is None:
            target, options = self._channel_args()
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(target, options=options)
            else:
                self._channel = grpc.aio.secure_channel(target, self._credentials, options=options)
            self._stub = textgen_pb2_grpc.TextGenerationStub(self._channel)
        return self._stub

    async def _generate(self, request: textgen_pb2.GenerateRequest, stream: bool) -> Completion | AsyncStream:
        if stream:
            attempts, slot = self._attempts(), CallSlot()
            return AsyncStream(self._stream_chunks(request, attempts, slot), attempts.request_id, slot)
        response: textgen_pb2.GenerateResponse
        response, request_id = await self._with_retries(
            lambda metadata: self._get_stub().Generate(request, timeout=self.timeout, metadata=metadata)
        )
        return completion_from_proto(response, request_id)

    def _raise_if_closed(self, attempts: Attempts, slot: CallSlot | None = None) -> None:
        """On a CancelledError: raise what the sync client raises when `close()` (the client's, or
        the stream's from another task) cancelled the call (grpc.aio cancels a call locally), unless
        this task itself is being cancelled, which must stay a CancelledError."""
        task = asyncio.current_task()
        cancelling = getattr(task, "cancelling", None)  # Python 3.11+
        error = self._closed_error(attempts, slot, "during the call")
        if error is not None and not (cancelling is not None and cancelling()):
            raise error from None

    async def _with_retries(self, call: Callable[[_Metadata], Awaitable[_T]]) -> tuple[_T, str]:
        """The result of `call(metadata)`, retried as the policy says, and the call's request id."""
        attempts = self._attempts()
        while True:
            try:
                return await call(attempts.metadata), attempts.request_id
            except grpc.RpcError as exc:
                delay = attempts.delay_after(exc)
            except asyncio.CancelledError:
                self._raise_if_closed(attempts)
                raise
            await asyncio.sleep(delay)
            self._check_not_closed_while_waiting(attempts)

    async def _stream_chunks(
        self, request: textgen_pb2.GenerateRequest, attempts: Attempts, slot: CallSlot
    ) -> AsyncGenerator[Chunk, None]:
        chunks = 0
        while True:
            try:
                stub = self._get_stub()
            except grpc.RpcError as exc:  # a list target whose names do not resolve (yet)
                delay = attempts.delay_after(exc)
                await asyncio.sleep(delay)
                self._check_not_closed_while_waiting(attempts, slot)
                continue
            call = stub.GenerateStream(request, timeout=self.timeout, metadata=attempts.metadata)
            slot.call = call
            try:
                async for message in call:
                    chunks += 1
                    yield chunk_from_proto(message)
                return
            except grpc.RpcError as exc:
                delay = attempts.delay_after(exc, chunks_yielded=chunks)
            except asyncio.CancelledError:
                self._raise_if_closed(attempts, slot)
                raise
            finally:
                call.cancel()  # no-op once the call has ended; stops the server when we stop early
            await asyncio.sleep(delay)
            self._check_not_closed_while_waiting(attempts, slot)
