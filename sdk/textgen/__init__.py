"""Typed Python client of the textgen gRPC service (Mistral-7B-Instruct-v0.2).

    from textgen import Client

    with Client("localhost:50051") as client:
        print(client.generate("Tell me a joke", max_tokens=32).response)

`AsyncClient` mirrors `Client` on asyncio. Errors are subclasses of `TextgenError`.
"""

from ._async_client import AsyncClient, AsyncStream
from ._channel import tls_credentials
from ._client import Client, Stream
from ._exceptions import (
    AbortedError,
    AlreadyExistsError,
    APIStatusError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    InvalidRequestError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    RequestCancelledError,
    ResourceExhaustedError,
    TextgenError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
    error_from_status,
)
from ._types import (
    Chunk,
    Completion,
    FinishReason,
    FlatTool,
    Message,
    ModelInfo,
    ResponseFormat,
    Token,
    Tool,
    ToolCall,
    ToolChoice,
    ToolFunction,
    Usage,
)
from ._version import __version__

__all__ = [
    "APIStatusError",
    "AbortedError",
    "AlreadyExistsError",
    "AsyncClient",
    "AsyncStream",
    "Chunk",
    "Client",
    "Completion",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "FinishReason",
    "FlatTool",
    "InternalError",
    "InvalidArgumentError",
    "InvalidRequestError",
    "Message",
    "ModelInfo",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "RequestCancelledError",
    "ResourceExhaustedError",
    "ResponseFormat",
    "Stream",
    "TextgenError",
    "Token",
    "Tool",
    "ToolCall",
    "ToolChoice",
    "ToolFunction",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "Usage",
    "__version__",
    "error_from_status",
    "tls_credentials",
]
