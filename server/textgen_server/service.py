"""The gRPC servicer: validate, hand to the scheduler, relay tokens. No sampling or stopping here.

Each Generate/GenerateStream call fills a RequestRecord as it runs; `on_request_end` receives it
when the call ends, however it ends (metrics and the request's log line come from it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import NoReturn

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from textgen.v1 import textgen_pb2 as pb
from textgen.v1 import textgen_pb2_grpc

from .adapters import AdapterRegistry
from .generation import TokenEvent
from .grammar import GrammarCompiler
from .handles import RequestHandle
from .model_config import ModelConfig
from .request_log import RequestRecord
from .scheduler import (
    GenerationFailedError,
    PassOutOfMemoryError,
    QueueFullError,
    RequestTooLargeError,
    Scheduler,
    ShuttingDownError,
)
from .stopping import FinishReason
from .tokenizer import Tokenizer
from .tools import ToolCall
from .validation import (
    FieldViolation,
    InvalidRequestError,
    UnknownAdapterError,
    UnsupportedFeatureError,
    build_request,
)

log = logging.getLogger(__name__)

GenerateContext = grpc.aio.ServicerContext[pb.GenerateRequest, pb.GenerateResponse]
StreamContext = grpc.aio.ServicerContext[pb.GenerateRequest, pb.GenerateStreamResponse]
InfoContext = grpc.aio.ServicerContext[pb.GetModelInfoRequest, pb.GetModelInfoResponse]
AnyContext = GenerateContext | StreamContext | InfoContext

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/-]{1,128}")
RETRY_PUSHBACK_HEADER = "grpc-retry-pushback-ms"
QUEUE_FULL_PUSHBACK_MS = 250
"""When the queue is full, the client is told to wait this long before retrying (gRPC's retry
pushback; the textgen SDK honours it, and with several replicas retries on the next one)."""
_REFUSAL_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (UnknownAdapterError, grpc.StatusCode.NOT_FOUND),
    (UnsupportedFeatureError, grpc.StatusCode.UNIMPLEMENTED),
    (ShuttingDownError, grpc.StatusCode.UNAVAILABLE),
)
DEADLINE_SKEW_S = 0.1
"""How far the server's deadline may trail the client's (the call's time in transit and in grpc's
queues): a call that ends this close to its deadline is counted DEADLINE_EXCEEDED, not CANCELLED."""
_FINISH_REASONS = {FinishReason.STOP: pb.FINISH_REASON_STOP, FinishReason.LENGTH: pb.FINISH_REASON_LENGTH}


class ModelState:
    """What the servicer needs once the model is loaded; None until then (UNAVAILABLE)."""

    def __init__(
        self,
        scheduler: Scheduler,
        tokenizer: Tokenizer,
        config: ModelConfig,
        execution_provider: str,
        adapters: AdapterRegistry | None = None,
        *,
        kv_slots: int = 0,
        kv_cache_bytes: int = 0,
        max_batch_prefill_tokens: int | None = None,
        grammars: GrammarCompiler | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.config = config
        self.execution_provider = execution_provider
        self.adapters = adapters  # --lora-dir's registry; it changes while serving (SIGHUP)
        self.kv_slots = kv_slots
        self.kv_cache_bytes = kv_cache_bytes
        # The server's limit in effect: --max-batch-prefill-tokens, capped by the model's own.
        self.max_batch_prefill_tokens = (
            config.max_batch_prefill_tokens if max_batch_prefill_tokens is None else max_batch_prefill_tokens
        )
        self.grammars = grammars  # tools and response_format; without it they are UNIMPLEMENTED

    def adapter_names(self) -> frozenset[str]:
        return self.adapters.names() if self.adapters is not None else frozenset()


class TextGenerationService(textgen_pb2_grpc.TextGenerationServicer):
    def __init__(
        self,
        model_name: str | None = None,
        on_request_end: Callable[[RequestRecord], None] | None = None,
        validation_workers: int = 2,
    ) -> None:
        """`validation_workers`: the threads that turn requests into generation requests (parse,
        tokenize, compile grammars), off the event loop; more requests wait for one."""
        self.model: ModelState | None = None
        self.model_name = model_name
        self._on_request_end = on_request_end
        self._validation = ThreadPoolExecutor(validation_workers, thread_name_prefix="textgen-validate")

    def close(self) -> None:
        """Stop the validation threads (requests still waiting for one are dropped: the server has
        stopped serving)."""
        self._validation.shutdown(wait=False, cancel_futures=True)

    async def Generate(self, request: pb.GenerateRequest, context: GenerateContext) -> pb.GenerateResponse:
        with self._recording("Generate", context) as record:
            handle = await self._submit(request, context, record)
            text: list[str] = []
            last: TokenEvent | None = None
            try:
                # aclosing: the events' own cleanup (what the record keeps) runs before the record is
                # logged, also when the client goes away mid-way.
                async with contextlib.aclosing(self._events(handle, context, record)) as events:
                    async for event in events:
                        text.append(event.text)
                        last = event
            finally:
                handle.cancel()  # no-op when finished; stops the work when the client went away
            if last is None:
                await _abort(context, record, grpc.StatusCode.CANCELLED, "the request was cancelled")
            # The events of a request always end with its finish reason; only a cancel cuts them short.
            assert last.finish_reason is not None, "generation ended without a finish reason"
            return pb.GenerateResponse(
                response="".join(text),
                tool_calls=_tool_calls(last.tool_calls),
                usage=_usage(last),
                finish_reason=_FINISH_REASONS[last.finish_reason],
            )

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: StreamContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        with self._recording("GenerateStream", context) as record:
            handle = await self._submit(request, context, record)
            try:
                async with contextlib.aclosing(self._events(handle, context, record)) as events:
                    async for event in events:
                        message = pb.GenerateStreamResponse(
                            response=event.text,
                            token=pb.Token(id=event.token_id, text=event.text, special=event.special),
                        )
                        if event.finish_reason is not None:
                            message.finish_reason = _FINISH_REASONS[event.finish_reason]
                            message.usage.CopyFrom(_usage(event))
                            message.tool_calls.extend(_tool_calls(event.tool_calls))
                        yield message
            finally:
                handle.cancel()

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: InfoContext
    ) -> pb.GetModelInfoResponse:
        model = await self._loaded(context, None)
        c = model.config
        return pb.GetModelInfoResponse(
            model=self.model_name or c.name,
            dtype=c.dtype,
            weight_dtype=c.weight_dtype,
            execution_provider=model.execution_provider,
            max_input_length=c.max_input_length,
            max_total_tokens=c.max_total_tokens,
            max_batch_prefill_tokens=model.max_batch_prefill_tokens,
            vocab_size=c.vocab_size,
            adapters=sorted(model.adapter_names()),
            kv_slots=model.kv_slots,
            kv_cache_bytes=model.kv_cache_bytes,
        )

    # -- helpers -------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _recording(self, method: str, context: AnyContext) -> Iterator[RequestRecord]:
        """A RequestRecord for the call, handed to `on_request_end` with its final status."""
        record = RequestRecord(method)
        try:
            yield record
            if record.finish_reason is None:  # a stream that ended without its last token
                record.code = grpc.StatusCode.CANCELLED
        except (asyncio.CancelledError, GeneratorExit):  # the client cancelled, or its deadline passed
            record.code = _client_left(context)
            raise
        except BaseException:
            if record.code == grpc.StatusCode.OK:  # not an abort of ours: grpc reports it as UNKNOWN
                record.code = grpc.StatusCode.UNKNOWN
            raise
        finally:
            record.ended = time.monotonic()
            if self._on_request_end is not None:
                self._on_request_end(record)

    async def _loaded(self, context: AnyContext, record: RequestRecord | None) -> ModelState:
        if self.model is None:
            await _abort(
                context, record, grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly"
            )
        return self.model

    async def _submit(
        self, request: pb.GenerateRequest, context: AnyContext, record: RequestRecord
    ) -> RequestHandle:
        model = await self._loaded(context, record)
        record.request_id = request_id = _request_id(context)
        try:
            await context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
        except Exception:
            # Sending fails only when the call is already over on the wire (the client cancelled, its
            # deadline passed, its connection dropped) but grpc has not yet told the servicer: the
            # client left, no server fault. grpc logs the failed send itself.
            record.code = _client_left(context)
            raise
        try:
            # On a validation thread: tokenizing a long chat takes milliseconds and compiling a large
            # schema a tenth of a second (both let go of the GIL), which every running stream's
            # tokens would otherwise wait out on this event loop; and no more of them at once than
            # there are validation threads, so that the forward passes keep their cores.
            typed = await asyncio.get_running_loop().run_in_executor(
                self._validation,
                functools.partial(
                    build_request,
                    request,
                    tokenizer=model.tokenizer,
                    config=model.config,
                    adapters=model.adapter_names(),
                    request_id=request_id,
                    grammars=model.grammars,
                ),
            )
            record.adapter = typed.lora
            record.prompt_tokens = len(typed.prompt_ids)
            record.max_new_tokens = typed.max_new_tokens
            handle = model.scheduler.submit(typed)
        except (InvalidRequestError, RequestTooLargeError) as exc:
            violations = (
                exc.violations
                if isinstance(exc, InvalidRequestError)
                else [FieldViolation(exc.field, exc.description)]
            )
            await abort_bad_request(context, record, violations)
        except QueueFullError as exc:
            pushback = ((RETRY_PUSHBACK_HEADER, str(QUEUE_FULL_PUSHBACK_MS)),)
            await _abort(context, record, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), pushback)
        except (UnknownAdapterError, UnsupportedFeatureError, ShuttingDownError) as exc:
            code = next(code for kind, code in _REFUSAL_CODES if isinstance(exc, kind))
            await _abort(context, record, code, str(exc))
        record.submitted = time.monotonic()
        return handle

    async def _events(
        self, handle: RequestHandle, context: AnyContext, record: RequestRecord
    ) -> AsyncGenerator[TokenEvent, None]:
        try:
            async for event in handle.events():
                record.add_token(event)
                # The grammar failed, or made calls no response can carry: the output would break
                # the promise.
                if event.error is not None and event.error_field is not None:
                    # One of llguidance's limits, reached part-way: the schema asks too much.
                    log.warning(
                        "request %s: the grammar of %s gave up: %s",
                        handle.request.request_id,
                        event.error_field,
                        event.error,
                    )
                    violation = FieldViolation(event.error_field, f"too complex to follow: {event.error}")
                    await abort_bad_request(context, record, [violation])
                if event.error is not None:
                    log.error(
                        "request %s: constrained decoding failed: %s", handle.request.request_id, event.error
                    )
                    await _abort(
                        context,
                        record,
                        grpc.StatusCode.INTERNAL,
                        f"constrained decoding failed: {event.error}",
                    )
                yield event
        except ShuttingDownError as exc:
            await _abort(context, record, grpc.StatusCode.UNAVAILABLE, str(exc))
        except UnknownAdapterError as exc:  # its adapter could not be loaded while it waited
            await _abort(context, record, grpc.StatusCode.NOT_FOUND, str(exc))
        except PassOutOfMemoryError as exc:
            await _abort(context, record, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except GenerationFailedError as exc:
            log.error("request %s failed: %s", handle.request.request_id, exc)
            await _abort(context, record, grpc.StatusCode.INTERNAL, str(exc))
        finally:
            record.admitted = handle.admitted


def _client_left(context: AnyContext) -> grpc.StatusCode:
    """How a call the client walked away from ends: DEADLINE_EXCEEDED once its deadline passed.

    The server's deadline is the client's timeout counted from when the call arrived, so it falls a
    little after the client's own: a client whose deadline fires cancels the call while the server
    still has a few milliseconds left. Within DEADLINE_SKEW_S of the deadline, the deadline it is.
    """
    remaining = context.time_remaining()
    expired = remaining is not None and remaining <= DEADLINE_SKEW_S
    return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED


def _request_id(context: AnyContext) -> str:
    """The client's x-request-id when it is a plain token (it goes into log lines), else a new one."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


def _tool_calls(calls: tuple[ToolCall, ...]) -> list[pb.ToolCall]:
    messages = []
    for call in calls:
        message = pb.ToolCall(name=call.name)
        message.arguments.update(call.arguments)
        messages.append(message)
    return messages


def _usage(event: TokenEvent) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        total_tokens=event.prompt_tokens + event.completion_tokens,
    )


async def _abort(
    context: AnyContext,
    record: RequestRecord | None,
    code: grpc.StatusCode,
    message: str,
    trailing_metadata: tuple[tuple[str, str], ...] = (),
) -> NoReturn:
    if record is not None:
        record.code = code
    await context.abort(code, message, trailing_metadata)
    raise AssertionError("unreachable: abort raises")


async def abort_bad_request(
    context: AnyContext, record: RequestRecord | None, violations: list[FieldViolation]
) -> NoReturn:
    """INVALID_ARGUMENT with a google.rpc.BadRequest; a violation of the whole request has no field."""
    if record is not None:
        record.code = grpc.StatusCode.INVALID_ARGUMENT
    details = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in violations
        ]
    )
    message = "; ".join(f"{v.field}: {v.description}" if v.field else v.description for v in violations)
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message)
    status.details.add().Pack(details)
    await context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("unreachable: abort raises")
