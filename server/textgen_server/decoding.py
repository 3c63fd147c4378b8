"""Requests protobuf cannot decode get INVALID_ARGUMENT naming the field and the reason, not UNKNOWN.

grpc.aio decodes a request before any handler runs; when the deserializer raises (protobuf's
DecodeError: a truncated or corrupt message, invalid UTF-8 in a string field, nesting past the
decoder's depth limit) the call ends UNKNOWN "Unexpected <class DecodeError>" and nothing of ours
sees it. `UndecodableRequestInterceptor` gives every method a deserializer that returns an
`UndecodableRequest` instead of raising, and a behaviour that answers it with INVALID_ARGUMENT and a
google.rpc.BadRequest before the servicer sees it (for server reflection's request stream, when
the servicer reads it): servicers only ever see decoded messages.

upb's DecodeError says what went wrong but not where; `diagnose` finds the field by walking the
bytes with the message's descriptor, reading each level as unknown fields of an empty message so
that nothing but the wire framing is checked there. That walk is Python, a field at a time (0.35 s
for a 1 MB request of 260,000 strings), so it runs on a thread of the interceptor's, not on the
event loop that every stream's tokens go out through; one thread, so that a flood of undecodable
requests waits its turn there instead of taking every core.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
from google.protobuf import descriptor_pool, empty_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from .service import abort_bad_request
from .validation import FieldViolation

# upb's default decoding depth limit (kUpb_WireFormat_DefaultDepthLimit): how many levels of
# submessages may sit below the request itself. A JSON object inside a google.protobuf.Struct costs
# three (the Struct, its map entry, the Value).
MAX_DEPTH = 100
_LENGTH_DELIMITED = 2  # wire type of strings, bytes and submessages


@dataclass(frozen=True)
class UndecodableRequest:
    """What the tolerant deserializer hands on instead of raising: the bytes, not yet diagnosed."""

    descriptor: Descriptor
    data: bytes
    error: DecodeError

    def violation(self) -> FieldViolation:
        return diagnose(self.descriptor, self.data, self.error)


def diagnose(descriptor: Descriptor, data: bytes, error: DecodeError) -> FieldViolation:
    """The first field of `data` (an encoded `descriptor` message) that protobuf cannot decode, and why."""
    found = _find(descriptor, data, path="", depth=0, opaque=False)
    if found is not None:
        return found
    # Not located (a limit this walk does not model): upb's own reason, which quotes no user bytes.
    return FieldViolation("", f"the request ({descriptor.full_name}) cannot be decoded: {error}")


def _find(descriptor: Descriptor, data: bytes, path: str, depth: int, opaque: bool) -> FieldViolation | None:
    try:
        fields = UnknownFieldSet(empty_pb2.Empty.FromString(data))
    except DecodeError:
        where = path or f"the request ({descriptor.full_name})"
        return FieldViolation(path, f"{where} is truncated or corrupt: not valid protobuf wire format")
    seen: collections.Counter[int] = collections.Counter()
    for position in range(len(fields)):
        unknown = fields[position]
        field = descriptor.fields_by_number.get(unknown.field_number)
        # Other wire types carry neither text nor submessages; unknown numbers are skipped by upb.
        if field is None or unknown.wire_type != _LENGTH_DELIMITED:
            continue
        index = seen[field.number]
        seen[field.number] += 1
        # Inside a well-known type (a tool's Struct parameters) the user's own path is the one they
        # know: "chat.tools[0].function.parameters", not the Struct's map entries and Values.
        name = path if opaque else _join(path, field, index)
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                bytes(unknown.data).decode("utf-8")
            except UnicodeDecodeError as exc:
                return FieldViolation(name, f"is not valid UTF-8 (invalid byte at offset {exc.start})")
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth + 1 > MAX_DEPTH:
                return FieldViolation(
                    name,
                    f"nests more than {MAX_DEPTH} messages deep, the most protobuf decodes "
                    "(a JSON object inside a Struct is 3 levels)",
                )
            inner = field.message_type
            assert inner is not None  # a TYPE_MESSAGE field always has its message type
            found = _find(
                inner, bytes(unknown.data), name, depth + 1, opaque or inner.file.package == "google.protobuf"
            )
            if found is not None:
                return found
    return None


def _join(path: str, field: FieldDescriptor, index: int) -> str:
    name = f"{path}.{field.name}" if path else field.name
    return f"{name}[{index}]" if field.is_repeated else name


def tolerant_deserializer(
    descriptor: Descriptor, deserialize: Callable[[bytes], Any]
) -> Callable[[bytes], Any]:
    def tolerant(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as error:
            return UndecodableRequest(descriptor, data, error)  # diagnosed off the event loop

    return tolerant


Refusal = Callable[[str], None]  # called with the method, e.g. "/textgen.v1.TextGeneration/Generate"
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class UndecodableRequestInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every unary-request method so that an undecodable request is refused as INVALID_ARGUMENT."""

    def __init__(self, on_refused: Refusal | None = None) -> None:
        self._on_refused = on_refused
        self._wrapped: dict[str, Handler] = {}
        self._diagnosis = ThreadPoolExecutor(1, thread_name_prefix="textgen-diagnose")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        method: str = details.method
        if handler is None:
            return None
        cached = self._wrapped.get(method)
        if cached is None:
            cached = self._wrapped[method] = self._wrap(method, handler)
        return cached

    def _wrap(self, method: str, handler: Handler) -> Handler:
        descriptor = _input_type(method)
        if descriptor is None or handler.request_deserializer is None:
            return handler
        deserialize = tolerant_deserializer(descriptor, handler.request_deserializer)
        refuse = functools.partial(self._refuse, method)
        if handler.request_streaming:
            if not (handler.response_streaming and inspect.isasyncgenfunction(handler.stream_stream)):
                return handler  # no such method here
            bidi_behaviour = handler.stream_stream  # server reflection

            async def stream_stream(
                requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                async def decoded() -> AsyncIterator[Any]:
                    async for request in requests:
                        if isinstance(request, UndecodableRequest):
                            await refuse(request, context)
                        yield request

                async for response in bidi_behaviour(decoded(), context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(
                stream_stream,
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        if handler.response_streaming and inspect.isasyncgenfunction(handler.unary_stream):
            stream_behaviour = handler.unary_stream

            async def unary_stream(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                if isinstance(request, UndecodableRequest):
                    await refuse(request, context)
                async for response in stream_behaviour(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        if handler.response_streaming and inspect.iscoroutinefunction(handler.unary_stream):
            writing_behaviour = handler.unary_stream  # streams with context.write (health's Watch)

            async def unary_stream_writing(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
                if isinstance(request, UndecodableRequest):
                    await refuse(request, context)
                await writing_behaviour(request, context)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream_writing,
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        if not handler.response_streaming and inspect.iscoroutinefunction(handler.unary_unary):
            unary_behaviour = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                if isinstance(request, UndecodableRequest):
                    await refuse(request, context)
                return await unary_behaviour(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, request_deserializer=deserialize, response_serializer=handler.response_serializer
            )
        return handler  # a synchronous behaviour: not ours, left as grpc serves it

    async def _refuse(
        self, method: str, request: UndecodableRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        if self._on_refused is not None:
            self._on_refused(method)
        violation = await asyncio.get_running_loop().run_in_executor(self._diagnosis, request.violation)
        await abort_bad_request(context, None, [violation])


def _input_type(method: str) -> Descriptor | None:
    """'/textgen.v1.TextGeneration/Generate' → the GenerateRequest descriptor (None when unknown)."""
    service, _, name = method.lstrip("/").rpartition("/")
    try:
        found: Descriptor = descriptor_pool.Default().FindMethodByName(f"{service}.{name}").input_type
    except KeyError:
        return None
    return found
