"""Error messages quote at most a short excerpt of what was sent (issue 14, cause 4).

A status travels in HTTP/2 trailers that gRPC caps at a few kilobytes; a message that echoes a
10,000-character field reaches the client as RESOURCE_EXHAUSTED about metadata size instead of
its own code.
"""

from __future__ import annotations

import grpc
import pytest
from textgen.v1 import textgen_pb2 as pb
from textgen.v1 import textgen_pb2_grpc as rpc
from textgen_server.excerpt import EXCERPT_CHARS, excerpt
from textgen_server.validation import MAX_REPORTED_VIOLATIONS

HUGE = "Z" * 10_000
# Longest status message these requests may produce: a field path, a description, one excerpt.
MAX_DETAILS_CHARS = 400


def test_excerpt_quotes_short_text_whole() -> None:
    assert excerpt("pirate") == "'pirate'"
    assert excerpt("x" * EXCERPT_CHARS) == repr("x" * EXCERPT_CHARS)


def test_excerpt_cuts_long_text_and_says_how_long() -> None:
    quoted = excerpt("ab" * 5000)
    assert quoted == repr("ab" * (EXCERPT_CHARS // 2)) + "... (10000 characters)"


def test_excerpt_escapes_what_would_garble_a_log_line() -> None:
    assert excerpt("a\nb\x00") == "'a\\nb\\x00'"


def _refusal(stub: rpc.TextGenerationStub, request: pb.GenerateRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(request, timeout=30)
    return caught.value


def test_huge_role_is_invalid_argument_with_an_excerpt(stub: rpc.TextGenerationStub) -> None:
    request = pb.GenerateRequest(max_tokens=2)
    request.chat.messages.add(role=HUGE, content="Hi")
    error = _refusal(stub, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    details = error.details() or ""
    assert details.startswith("chat.messages[0].role: unknown role 'ZZZZ")
    assert "(10000 characters)" in details and len(details) < MAX_DETAILS_CHARS


def test_huge_lora_is_not_found_with_an_excerpt(stub: rpc.TextGenerationStub) -> None:
    error = _refusal(stub, pb.GenerateRequest(prompt="Hi", max_tokens=2, lora=HUGE))
    assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
    details = error.details() or ""
    assert "(10000 characters)" in details and len(details) < MAX_DETAILS_CHARS


def test_a_flood_of_violations_reports_the_first_few(stub: rpc.TextGenerationStub) -> None:
    request = pb.GenerateRequest(max_tokens=2)
    for _ in range(150):  # 150 user messages over the content limit: 0.9 MB, under the 1 MiB cap
        request.chat.messages.add(role="user", content="x" * 6145)
    error = _refusal(stub, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    violations = (error.details() or "").split("; ")
    assert len(violations) == MAX_REPORTED_VIOLATIONS
    assert violations[0].startswith("chat.messages[0].content: must be at most 6144 characters")
    assert violations[-1].endswith(f"(and {150 - MAX_REPORTED_VIOLATIONS} more violations)")


def test_a_hundred_thousand_empty_stop_strings(stub: rpc.TextGenerationStub) -> None:
    error = _refusal(stub, pb.GenerateRequest(prompt="Hi", max_tokens=2, stop=[""] * 100_000))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert (error.details() or "").startswith("stop: at most 4 stop strings, got 100000")
    assert len(error.details() or "") < 8 * MAX_DETAILS_CHARS
