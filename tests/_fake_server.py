"""A fake textgen server for the SDK and CLI tests: the real service interface and wire format,
no model. It echoes the input back as word-by-word deltas, records every request, and can be
told to fail: planned status codes for the next calls, or UNAVAILABLE in the middle of a stream.

`metadata` records what each call sent (the SDK's x-request-id, its authorization).

Behaviour by request:
- planned failures (`fake.fail(code, times, pushback_ms)`) come first, one per call of any method,
  with the retry pushback trailer when `pushback_ms` is given;
- `max_tokens` < 1: INVALID_ARGUMENT with a google.rpc.BadRequest naming max_tokens;
- `lora == "missing"`: NOT_FOUND;  prompt "slow": answers after 2 s (for deadlines);
- prompt "endless": streams 500 deltas 10 ms apart; `client_left` is set when the RPC ends;
- chat with tools: one call of the first tool with arguments {"text": <last message>, "n": 3}
  (on the last message of a stream).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc
from google.protobuf import any_pb2, struct_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from textgen.v1 import textgen_pb2, textgen_pb2_grpc

MODEL_INFO = textgen_pb2.GetModelInfoResponse(
    model="@hf/mistral/mistral-7b-instruct-v0.2",
    dtype="fp32",
    execution_provider="CPUExecutionProvider",
    max_input_length=3072,
    max_total_tokens=4096,
    max_batch_prefill_tokens=8192,
    vocab_size=32000,
    adapters=["pirate"],
)


# grpc binds with SO_REUSEPORT unless told not to: port 0 can then hand out a port another server of
# the test run still holds, and a client reach the wrong one (grpc/grpc#10755). textgen-server sets
# the same option.
EXCLUSIVE_PORT = [("grpc.so_reuseport", 0)]


class FakeTextGeneration(textgen_pb2_grpc.TextGenerationServicer):
    def __init__(self) -> None:
        self.target = ""
        self.requests: list[textgen_pb2.GenerateRequest] = []
        self.calls = 0
        self.fail_stream_after: int | None = None
        self.client_left = threading.Event()
        self.metadata: list[dict[str, str]] = []
        self._failures: list[tuple[grpc.StatusCode, str | None]] = []
        self._lock = threading.Lock()

    def fail(self, code: grpc.StatusCode, times: int = 1, pushback_ms: str | None = None) -> None:
        """Fail the next `times` calls with `code` (and a grpc-retry-pushback-ms trailer)."""
        self._failures.extend([(code, pushback_ms)] * times)

    # -- the service ---------------------------------------------------------------------------

    def Generate(
        self, request: textgen_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> textgen_pb2.GenerateResponse:
        self._begin(request, context)
        if request.prompt == "slow":
            time.sleep(2)
        deltas, finish_reason = self._deltas(request)
        return textgen_pb2.GenerateResponse(
            response="".join(deltas) if not request.chat.tools else "",
            tool_calls=self._tool_calls(request),
            usage=self._usage(request, deltas),
            finish_reason=finish_reason,
        )

    def GenerateStream(
        self, request: textgen_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[textgen_pb2.GenerateStreamResponse]:
        self._begin(request, context)
        if request.prompt == "endless":
            # 5 s of deltas; the RPC ending much sooner means the client cancelled it.
            context.add_callback(self.client_left.set)
            for i in range(500):
                if not context.is_active():
                    return
                yield textgen_pb2.GenerateStreamResponse(
                    response=" x", token=textgen_pb2.Token(id=i, text="x")
                )
                time.sleep(0.01)
            return
        deltas, finish_reason = self._deltas(request)
        for i, delta in enumerate(deltas):
            if self.fail_stream_after is not None and i == self.fail_stream_after:
                context.abort(grpc.StatusCode.UNAVAILABLE, "draining")
            yield textgen_pb2.GenerateStreamResponse(
                response=delta, token=textgen_pb2.Token(id=100 + i, text=delta.strip(), special=False)
            )
        yield textgen_pb2.GenerateStreamResponse(
            finish_reason=finish_reason,
            usage=self._usage(request, deltas),
            tool_calls=self._tool_calls(request),
        )

    def GetModelInfo(
        self, request: textgen_pb2.GetModelInfoRequest, context: grpc.ServicerContext
    ) -> textgen_pb2.GetModelInfoResponse:
        self._begin(None, context)
        return MODEL_INFO

    # -- helpers -------------------------------------------------------------------------------

    def _begin(self, request: textgen_pb2.GenerateRequest | None, context: grpc.ServicerContext) -> None:
        metadata = {key: value for key, value in context.invocation_metadata() if isinstance(value, str)}
        with self._lock:
            self.calls += 1
            self.metadata.append(metadata)
            if request is not None:
                copy = textgen_pb2.GenerateRequest()
                copy.CopyFrom(request)
                self.requests.append(copy)
            failure = self._failures.pop(0) if self._failures else None
        if failure is not None:
            code, pushback_ms = failure
            if pushback_ms is not None:
                context.set_trailing_metadata((("grpc-retry-pushback-ms", pushback_ms),))
            context.abort(code, f"planned {code.name}")
        if request is None:
            return
        if request.HasField("max_tokens") and request.max_tokens < 1:
            detail = any_pb2.Any()
            detail.Pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field="max_tokens", description=f"must be >= 1, got {request.max_tokens}"
                        )
                    ]
                )
            )
            status = status_pb2.Status(
                code=code_pb2.INVALID_ARGUMENT, message="invalid GenerateRequest", details=[detail]
            )
            context.abort_with_status(rpc_status.to_status(status))
        if request.lora == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown adapter 'missing'")

    @staticmethod
    def _text(request: textgen_pb2.GenerateRequest) -> str:
        if request.WhichOneof("input") == "chat":
            return request.chat.messages[-1].content if request.chat.messages else ""
        return request.prompt

    def _deltas(
        self, request: textgen_pb2.GenerateRequest
    ) -> tuple[list[str], textgen_pb2.FinishReason.ValueType]:
        words = self._text(request).split(" ")
        deltas = [words[0]] + [" " + word for word in words[1:]]
        if request.HasField("max_tokens") and request.max_tokens < len(deltas):
            return deltas[: request.max_tokens], textgen_pb2.FINISH_REASON_LENGTH
        return deltas, textgen_pb2.FINISH_REASON_STOP

    def _tool_calls(self, request: textgen_pb2.GenerateRequest) -> list[textgen_pb2.ToolCall]:
        if not request.chat.tools:
            return []
        arguments = struct_pb2.Struct()
        arguments.update({"text": self._text(request), "n": 3})
        return [textgen_pb2.ToolCall(name=request.chat.tools[0].function.name, arguments=arguments)]

    def _usage(self, request: textgen_pb2.GenerateRequest, deltas: list[str]) -> textgen_pb2.Usage:
        prompt_tokens = len(self._text(request).split(" "))
        return textgen_pb2.Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=len(deltas),
            total_tokens=prompt_tokens + len(deltas),
        )


@contextmanager
def serve() -> Iterator[FakeTextGeneration]:
    """A FakeTextGeneration on an in-process server bound to a free port; `.target` is its address."""
    fake = FakeTextGeneration()
    server = grpc.server(ThreadPoolExecutor(max_workers=8), options=EXCLUSIVE_PORT)
    textgen_pb2_grpc.add_TextGenerationServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    fake.target = f"127.0.0.1:{port}"
    try:
        yield fake
    finally:
        server.stop(None)
