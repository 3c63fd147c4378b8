"""The synchronous client. `_async_client.py` mirrors it method for method on grpc.aio; what they
share (settings, metadata, retry policy) is in `_base.py`, requests are built in `_convert.py`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import grpc

from ._base import BaseClient, CallSlot
from ._channel import CHANNEL_OPTIONS
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

__all__ = ["CHANNEL_OPTIONS", "Client", "Stream"]

if TYPE_CHECKING:
    from typing_extensions import Self

_T = TypeVar("_T")
_Metadata = tuple[tuple[str, str], ...]


class Stream(Iterator[Chunk]):
    """The chunks of a streaming generation, as they arrive. Their `response` deltas concatenate
    to the full text; the last chunk carries `finish_reason` and `usage`. Errors (an
    APIStatusError) are raised from iteration. `close()`, or leaving a `with` block, cancels the
    call on the server; so does dropping the stream unfinished (once it is garbage-collected), but
    use `with` to stop the server at once. `request_id` is the x-request-id of the call."""

    def __init__(self, chunks: Generator[Chunk, None, None], request_id: str, slot: CallSlot) -> None:
        self._chunks = chunks
        self._slot = slot
        self.request_id = request_id

    def __next__(self) -> Chunk:
        return next(self._chunks)

    def __iter__(self) -> Self:
        return self

    def close(self) -> None:
        """Stop the stream; the server stops generating. From another thread than the one iterating
        (a cancel button, a watchdog), that thread's iteration raises RequestCancelledError."""
        self._slot.closed = True
        call = self._slot.call
        if call is not None:
            call.cancel()  # grpc's calls may be cancelled from any thread
        try:
            self._chunks.close()
        except ValueError:  # "generator already executing": in another thread, which the cancel ends
            pass

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        call = self._slot.call
        if call is not None:
            call.cancel()  # a no-op once the call has ended


class Client(BaseClient):
    """A client of a textgen server.

    `target` is `host:port`, any gRPC target (`dns:///name:port` for the replicas behind a
    headless Service), or a list of `host:port` replicas (names resolved once, at the first call);
    calls are spread over the replicas round-robin. `timeout` is the deadline in seconds of each
    attempt of a call (None or inf: no deadline; at most 1e9 otherwise). UNAVAILABLE, and
    RESOURCE_EXHAUSTED with the server's retry pushback, are retried up to `max_retries` times (see
    `_retry`); other errors are raised at once, and a stream is never retried once it has yielded a chunk. `credentials` (e.g.
    `textgen.tls_credentials(ca=...)`) selects a TLS channel; `token` (default: $TEXTGEN_TOKEN) is
    sent as `authorization: Bearer <token>`. Use it as a context manager, or call close(), to
    close the channel.
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
        self._channel: grpc.Channel | None = None
        self._stub: textgen_pb2_grpc.TextGenerationStub | None = None
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
        response_format: ResponseFormat | None = None,
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
        response_format: ResponseFormat | None = None,
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
        response_format: ResponseFormat | None = None,
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
        response_format: ResponseFormat | None = None,
        stream: bool = False,
    ) -> Completion | Stream:
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
        return self._generate(request, stream)

    @overload
    def chat(
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
    def chat(
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
    ) -> Stream: ...
    @overload
    def chat(
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
    ) -> Completion | Stream: ...
    def chat(
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
    ) -> Completion | Stream:
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
        return self._generate(request, stream)

    def run(self, body: Mapping[str, Any]) -> Completion | Stream:
        """Run a Workers AI request body as it is: {"prompt": ...} or {"messages": ...}, with any
        of the card's options. Returns a Stream when the body says "stream": true, else a
        Completion. Raises InvalidRequestError for a body that is not one of the card's two forms."""
        request, stream = request_from_body(body)
        return self._generate(request, stream)

    def model_info(self) -> ModelInfo:
        """The served model: name, limits, dtype, execution provider and adapters."""
        response: textgen_pb2.GetModelInfoResponse
        response, _ = self._with_retries(
            lambda metadata: self._get_stub().GetModelInfo(
                textgen_pb2.GetModelInfoRequest(), timeout=self.timeout, metadata=metadata
            )
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
            self._check_open()
            if self._stub is None:
                target, options = self._channel_args()
                if self._credentials is None:
                    self._channel = grpc.insecure_channel(target, options=options)
                else:
                    self._channel = grpc.secure_channel(target, self._credentials, options=options)
                self._stub = textgen_pb2_grpc.TextGenerationStub(self._channel)
            return self._stub

    def _generate(self, request: textgen_pb2.GenerateRequest, stream: bool) -> Completion | Stream:
        if stream:
            attempts, slot = self._attempts(), CallSlot()
            return Stream(self._stream_chunks(request, attempts, slot), attempts.request_id, slot)
        response: textgen_pb2.GenerateResponse
        response, request_id = self._with_retries(
            lambda metadata: self._get_stub().Generate(request, timeout=self.timeout, metadata=metadata)
        )
        return completion_from_proto(response, request_id)

    def _with_retries(self, call: Callable[[_Metadata], _T]) -> tuple[_T, str]:
        """The result of `call(metadata)`, retried as the policy says, and the call's request id."""
        attempts = self._attempts()
        while True:
            try:
                return call(attempts.metadata), attempts.request_id
            except grpc.RpcError as exc:
                delay = attempts.delay_after(exc)
            time.sleep(delay)
            self._check_not_closed_while_waiting(attempts)

    def _stream_chunks(
        self, request: textgen_pb2.GenerateRequest, attempts: Attempts, slot: CallSlot
    ) -> Generator[Chunk, None, None]:
        chunks = 0
        while True:
            try:
                stub = self._get_stub()
            except grpc.RpcError as exc:  # a list target whose names do not resolve (yet)
                delay = attempts.delay_after(exc)
                time.sleep(delay)
                self._check_not_closed_while_waiting(attempts, slot)
                continue
            call = stub.GenerateStream(request, timeout=self.timeout, metadata=attempts.metadata)
            slot.call = call
            try:
                for message in call:
                    chunks += 1
                    yield chunk_from_proto(message)
                return
            except grpc.RpcError as exc:
                delay = attempts.delay_after(exc, chunks_yielded=chunks)
            finally:
                call.cancel()  # no-op once the call has ended; stops the server when we stop early
            time.sleep(delay)
            self._check_not_closed_while_waiting(attempts, slot)
