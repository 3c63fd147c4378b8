"""Errors raised by the SDK: one base, one subclass per gRPC status code, one mapping function.

The server puts a `google.rpc.Status` with `google.rpc.BadRequest` details in the
`grpc-status-details-bin` trailer for bad input; `field_violations` carries them. The base install
has only grpcio and protobuf, so the two small google.rpc messages are declared here in a private
descriptor pool (no clash with googleapis-common-protos when both are loaded).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import grpc
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message, message_factory
from google.protobuf.message import DecodeError

__all__ = [
    "APIStatusError",
    "AbortedError",
    "AlreadyExistsError",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "InternalError",
    "InvalidArgumentError",
    "InvalidRequestError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "RequestCancelledError",
    "ResourceExhaustedError",
    "TextgenError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "error_from_rpc_error",
    "error_from_status",
]

STATUS_DETAILS_KEY: Final = "grpc-status-details-bin"
_BAD_REQUEST_TYPE: Final = "google.rpc.BadRequest"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request: `field` is its path (e.g. "max_tokens" or
    "chat.messages[0].content"), `description` says what is wrong."""

    field: str
    description: str


class TextgenError(Exception):
    """Base of every error the SDK raises."""


class InvalidRequestError(TextgenError, ValueError):
    """A request the SDK refuses before sending anything: a Workers AI body that is not one of
    the card's two forms, or a value its field cannot hold (a string for max_tokens, a seed
    beyond int64). The server's own checks raise InvalidArgumentError instead."""


class APIStatusError(TextgenError):
    """The server (or the channel) ended a call with a non-OK gRPC status."""

    code: grpc.StatusCode
    message: str
    field_violations: list[FieldViolation]
    trailing_metadata: tuple[tuple[str, str | bytes], ...]
    request_id: str | None
    """The call's x-request-id: the server logs the request under it (None if the call was never
    sent)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        field_violations: Iterable[FieldViolation] = (),
        trailing_metadata: Iterable[tuple[str, str | bytes]] = (),
        request_id: str | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.field_violations = list(field_violations)
        self.trailing_metadata = tuple(trailing_metadata)
        self.request_id = request_id
        suffix = f" [request_id={request_id}]" if request_id else ""
        super().__init__(f"{code.name}: {message}{suffix}")


class RequestCancelledError(APIStatusError):
    """CANCELLED: the call was cancelled (usually by the client)."""


class UnknownError(APIStatusError):
    """UNKNOWN"""


class InvalidArgumentError(APIStatusError):
    """INVALID_ARGUMENT: bad input; `field_violations` names the fields."""


class DeadlineExceededError(APIStatusError):
    """DEADLINE_EXCEEDED: the timeout passed before the call finished."""


class NotFoundError(APIStatusError):
    """NOT_FOUND: e.g. an unknown LoRA adapter."""


class AlreadyExistsError(APIStatusError):
    """ALREADY_EXISTS"""


class PermissionDeniedError(APIStatusError):
    """PERMISSION_DENIED"""


class ResourceExhaustedError(APIStatusError):
    """RESOURCE_EXHAUSTED: the server is full, the request exceeds a size limit, or the server ran out
    of memory for the request's own pass (prefilling its prompt, or decoding its row alone)."""


class FailedPreconditionError(APIStatusError):
    """FAILED_PRECONDITION"""


class AbortedError(APIStatusError):
    """ABORTED"""


class OutOfRangeError(APIStatusError):
    """OUT_OF_RANGE"""


class UnimplementedError(APIStatusError):
    """UNIMPLEMENTED: the server does not have this method."""


class InternalError(APIStatusError):
    """INTERNAL: a server bug; the server logs it with a request id."""


class UnavailableError(APIStatusError):
    """UNAVAILABLE: no connection, or the server is loading or draining. Retried by the SDK."""


class DataLossError(APIStatusError):
    """DATA_LOSS"""


class UnauthenticatedError(APIStatusError):
    """UNAUTHENTICATED"""


_ERRORS: Final[dict[grpc.StatusCode, type[APIStatusError]]] = {
    grpc.StatusCode.CANCELLED: RequestCancelledError,
    grpc.StatusCode.UNKNOWN: UnknownError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}


def error_from_status(
    code: grpc.StatusCode,
    message: str,
    trailing_metadata: Iterable[tuple[str, str | bytes]] = (),
    *,
    request_id: str | None = None,
) -> APIStatusError:
    """The exception for a call that ended with `code`: the status's own subclass of
    APIStatusError, with the BadRequest field violations found in the trailing metadata."""
    metadata = tuple((str(key), value) for key, value in trailing_metadata)
    violations: list[FieldViolation] = []
    for key, value in metadata:
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            violations.extend(_field_violations(value))
    cls = _ERRORS.get(code, APIStatusError)
    return cls(code, message, field_violations=violations, trailing_metadata=metadata, request_id=request_id)


def error_from_rpc_error(
    exc: grpc.RpcError, *, request_id: str | None = None, note: str = ""
) -> APIStatusError:
    """The exception for a failed call of grpc or grpc.aio (both raise a grpc.Call); `note` is
    appended to the server's message."""
    # grpc gives a tuple of (key, value) namedtuples, grpc.aio a Metadata of (key, value) pairs.
    metadata: Iterable[Any] = exc.trailing_metadata() or ()
    pairs = tuple((str(key), value) for key, value in metadata)
    return error_from_status(exc.code(), (exc.details() or "") + note, pairs, request_id=request_id)


def _google_rpc_pool() -> descriptor_pool.DescriptorPool:
    """google.rpc.Status and google.rpc.BadRequest, declared field for field as in googleapis."""
    fdp = descriptor_pb2.FieldDescriptorProto
    pool = descriptor_pool.DescriptorPool()
    pool.Add(descriptor_pb2.FileDescriptorProto.FromString(any_pb2.DESCRIPTOR.serialized_pb))
    proto = descriptor_pb2.FileDescriptorProto(
        name="textgen/_google_rpc.proto",
        package="google.rpc",
        syntax="proto3",
        dependency=["google/protobuf/any.proto"],
    )
    status = proto.message_type.add(name="Status")
    status.field.add(name="code", number=1, type=fdp.TYPE_INT32, label=fdp.LABEL_OPTIONAL)
    status.field.add(name="message", number=2, type=fdp.TYPE_STRING, label=fdp.LABEL_OPTIONAL)
    status.field.add(
        name="details",
        number=3,
        type=fdp.TYPE_MESSAGE,
        label=fdp.LABEL_REPEATED,
        type_name=".google.protobuf.Any",
    )
    bad_request = proto.message_type.add(name="BadRequest")
    violation = bad_request.nested_type.add(name="FieldViolation")
    for number, name in enumerate(("field", "description", "reason"), start=1):
        violation.field.add(name=name, number=number, type=fdp.TYPE_STRING, label=fdp.LABEL_OPTIONAL)
    bad_request.field.add(
        name="field_violations",
        number=1,
        type=fdp.TYPE_MESSAGE,
        label=fdp.LABEL_REPEATED,
        type_name=".google.rpc.BadRequest.FieldViolation",
    )
    pool.Add(proto)
    return pool


_POOL: Final = _google_rpc_pool()
_Status: Final = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("google.rpc.Status"))
_BadRequest: Final = message_factory.GetMessageClass(_POOL.FindMessageTypeByName(_BAD_REQUEST_TYPE))


def _field_violations(status_bytes: bytes) -> list[FieldViolation]:
    """The BadRequest field violations in a serialized google.rpc.Status; none when it has none
    or does not parse (the status code and message still tell what happened)."""
    try:
        status: Any = _parse(_Status, status_bytes)
        violations: list[FieldViolation] = []
        for detail in status.details:
            if detail.type_url.rpartition("/")[2] != _BAD_REQUEST_TYPE:
                continue
            bad_request: Any = _parse(_BadRequest, detail.value)
            violations.extend(
                FieldViolation(field=str(v.field), description=str(v.description))
                for v in bad_request.field_violations
            )
        return violations
    except DecodeError:
        return []


def _parse(cls: type[message.Message], data: bytes) -> message.Message:
    msg = cls()
    msg.ParseFromString(data)
    return msg
