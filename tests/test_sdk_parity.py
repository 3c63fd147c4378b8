"""Client and AsyncClient mirror each other: the same methods with the same parameters, and for
the same fake-server behaviour the same results, the same exceptions and the same requests sent."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import pytest
from _fake_server import FakeTextGeneration, serve
from textgen import (
    APIStatusError,
    AsyncClient,
    AsyncStream,
    Chunk,
    Client,
    Completion,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    InvalidRequestError,
    NotFoundError,
    ResourceExhaustedError,
    Stream,
    UnavailableError,
    _retry,
)

PUBLIC_METHODS = ["generate", "chat", "run", "model_info", "close"]


def _public(cls: type) -> set[str]:
    return {name for name, _ in inspect.getmembers(cls, inspect.isfunction) if not name.startswith("_")}


def test_the_clients_have_the_same_public_methods() -> None:
    assert _public(Client) == _public(AsyncClient) == set(PUBLIC_METHODS)
    assert _public(Stream) == _public(AsyncStream) == {"close"}


@pytest.mark.parametrize("name", ["__init__", *PUBLIC_METHODS])
def test_the_clients_have_the_same_signatures(name: str) -> None:
    sync_sig = inspect.signature(getattr(Client, name))
    async_sig = inspect.signature(getattr(AsyncClient, name))
    assert list(sync_sig.parameters) == list(async_sig.parameters)
    for sync_param, async_param in zip(sync_sig.parameters.values(), async_sig.parameters.values()):
        assert (sync_param.kind, sync_param.default) == (async_param.kind, async_param.default)
        assert str(sync_param.annotation) == str(async_param.annotation)
    assert str(sync_sig.return_annotation).replace("Stream", "AsyncStream") == str(
        async_sig.return_annotation
    )
    if name != "__init__":
        assert inspect.iscoroutinefunction(getattr(AsyncClient, name))


def test_the_overloads_mirror_each_other() -> None:
    from typing import get_overloads

    for name in ("generate", "chat"):
        sync_overloads = [inspect.signature(f) for f in get_overloads(getattr(Client, name))]
        async_overloads = [inspect.signature(f) for f in get_overloads(getattr(AsyncClient, name))]
        assert len(sync_overloads) == len(async_overloads) == 3
        for sync_sig, async_sig in zip(sync_overloads, async_overloads):
            assert str(sync_sig).replace("Stream", "AsyncStream") == str(async_sig)


# -- behaviour ----------------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    method: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    setup: Callable[[FakeTextGeneration], None] = lambda fake: None
    client: dict[str, Any] = field(default_factory=dict)
    raises: type[Exception] | None = None


def _fail(
    code: grpc.StatusCode, times: int, pushback_ms: str | None = None
) -> Callable[[FakeTextGeneration], None]:
    return lambda fake: fake.fail(code, times, pushback_ms)


def _fail_stream_after(n: int) -> Callable[[FakeTextGeneration], None]:
    def setup(fake: FakeTextGeneration) -> None:
        fake.fail_stream_after = n

    return setup


TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello you"}]

SCENARIOS = [
    Scenario("generate", "generate", ("Hello big world",), {"max_tokens": 8, "seed": 3, "stop": "x"}),
    Scenario("generate-length", "generate", ("one two three",), {"max_tokens": 2, "raw": True}),
    Scenario("generate-stream", "generate", ("one two three",), {"stream": True, "temperature": 0.0}),
    Scenario("chat", "chat", (CHAT,), {"top_k": 5}),
    Scenario("chat-tools", "chat", (CHAT,), {"tools": TOOLS}),
    Scenario("chat-stream", "chat", (CHAT,), {"stream": True, "lora": "pirate"}),
    Scenario("run-prompt", "run", ({"prompt": "a b", "max_tokens": 1},)),
    Scenario("run-messages-stream", "run", ({"messages": CHAT, "stream": True, "presence_penalty": 1.0},)),
    Scenario("model-info", "model_info"),
    Scenario("invalid-argument", "generate", ("Hi",), {"max_tokens": 0}, raises=InvalidArgumentError),
    Scenario(
        "invalid-argument-stream",
        "generate",
        ("Hi",),
        {"max_tokens": 0, "stream": True},
        raises=InvalidArgumentError,
    ),
    Scenario("not-found", "chat", (CHAT,), {"lora": "missing"}, raises=NotFoundError),
    Scenario(
        "resource-exhausted",
        "generate",
        ("Hi",),
        setup=_fail(grpc.StatusCode.RESOURCE_EXHAUSTED, 1),
        raises=ResourceExhaustedError,
    ),
    Scenario(
        "internal-stream",
        "generate",
        ("Hi",),
        {"stream": True},
        setup=_fail(grpc.StatusCode.INTERNAL, 1),
        raises=InternalError,
    ),
    Scenario("retried", "generate", ("Hi",), setup=_fail(grpc.StatusCode.UNAVAILABLE, 2)),
    Scenario(
        "retried-stream", "generate", ("Hi",), {"stream": True}, setup=_fail(grpc.StatusCode.UNAVAILABLE, 2)
    ),
    Scenario("retried-info", "model_info", setup=_fail(grpc.StatusCode.UNAVAILABLE, 1)),
    Scenario(
        "retried-after-pushback",
        "generate",
        ("Hi",),
        setup=_fail(grpc.StatusCode.RESOURCE_EXHAUSTED, 2, pushback_ms="0"),
    ),
    Scenario(
        "retried-stream-after-pushback",
        "chat",
        (CHAT,),
        {"stream": True},
        setup=_fail(grpc.StatusCode.RESOURCE_EXHAUSTED, 1, pushback_ms="0"),
    ),
    Scenario(
        "pushback-says-never",
        "generate",
        ("Hi",),
        setup=_fail(grpc.StatusCode.RESOURCE_EXHAUSTED, 1, pushback_ms="-1"),
        raises=ResourceExhaustedError,
    ),
    Scenario("token", "generate", ("Hi",), client={"token": "s3cret"}),
    Scenario(
        "retries-exhausted",
        "generate",
        ("Hi",),
        setup=_fail(grpc.StatusCode.UNAVAILABLE, 5),
        raises=UnavailableError,
    ),
    Scenario(
        "no-retries",
        "generate",
        ("Hi",),
        setup=_fail(grpc.StatusCode.UNAVAILABLE, 1),
        client={"max_retries": 0},
        raises=UnavailableError,
    ),
    Scenario(
        "cut-stream",
        "generate",
        ("a b c d",),
        {"stream": True},
        setup=_fail_stream_after(2),
        raises=UnavailableError,
    ),
    Scenario("deadline", "generate", ("slow",), client={"timeout": 0.2}, raises=DeadlineExceededError),
    Scenario("bad-body", "run", ({"prompt": "Hi", "tokens": 3},), raises=InvalidRequestError),
]


@dataclass
class Outcome:
    result: object = None
    chunks: list[Chunk] | None = None
    error: tuple[object, ...] | None = None
    calls: int = 0
    requests: list[bytes] = field(default_factory=list)
    authorization: list[str | None] = field(default_factory=list)  # per call
    request_ids: int = 0  # distinct x-request-ids sent: one per call, whatever its attempts
    request_id: str | None = None  # the result's or the error's (random: checked, not compared)

    def comparable(self) -> Outcome:
        result = self.result
        if isinstance(result, Completion):
            result = replace(result, request_id=None)
        return replace(self, result=result, request_id=None)


def _error(exc: Exception) -> tuple[object, ...]:
    if isinstance(exc, APIStatusError):
        return (type(exc), exc.code, exc.message, exc.field_violations)
    return (type(exc), str(exc))


def _run_sync(scenario: Scenario, fake: FakeTextGeneration) -> Outcome:
    outcome = Outcome()
    with Client(fake.target, **{"timeout": 5, **scenario.client}) as client:
        try:
            result = getattr(client, scenario.method)(*scenario.args, **scenario.kwargs)
            if isinstance(result, Stream):
                outcome.request_id = result.request_id
                outcome.chunks = []
                for chunk in result:
                    outcome.chunks.append(chunk)
            else:
                outcome.result = result
                outcome.request_id = getattr(result, "request_id", None)
        except (APIStatusError, InvalidRequestError) as exc:
            outcome.error = _error(exc)
            outcome.request_id = getattr(exc, "request_id", None)
    return outcome


async def _run_async(scenario: Scenario, fake: FakeTextGeneration) -> Outcome:
    outcome = Outcome()
    async with AsyncClient(fake.target, **{"timeout": 5, **scenario.client}) as client:
        try:
            result = await getattr(client, scenario.method)(*scenario.args, **scenario.kwargs)
            if isinstance(result, AsyncStream):
                outcome.request_id = result.request_id
                outcome.chunks = []
                async for chunk in result:
                    outcome.chunks.append(chunk)
            else:
                outcome.result = result
                outcome.request_id = getattr(result, "request_id", None)
        except (APIStatusError, InvalidRequestError) as exc:
            outcome.error = _error(exc)
            outcome.request_id = getattr(exc, "request_id", None)
    return outcome


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_retry, "backoff", lambda retries_done, **_: 0.0)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
async def test_sync_and_async_clients_behave_the_same(scenario: Scenario) -> None:
    outcomes: list[Outcome] = []
    for run_async in (False, True):
        with serve() as fake:
            scenario.setup(fake)
            # The sync client blocks this event loop while it runs; the server has its own threads.
            outcome = await _run_async(scenario, fake) if run_async else _run_sync(scenario, fake)
            outcome.calls = fake.calls
            outcome.requests = [request.SerializeToString(deterministic=True) for request in fake.requests]
            outcome.authorization = [metadata.get("authorization") for metadata in fake.metadata]
            sent_ids = {metadata.get("x-request-id") for metadata in fake.metadata}
            outcome.request_ids = len(sent_ids)
            if fake.calls and scenario.method != "model_info":
                assert outcome.request_id in sent_ids  # the id on the result or error is the one sent
        outcomes.append(outcome)
    sync, async_ = outcomes
    assert sync.comparable() == async_.comparable()
    assert sync.request_ids == min(sync.calls, 1)  # every attempt of a call sends the call's one id
    if scenario.raises is None:
        assert sync.error is None and (sync.result is not None or sync.chunks)
    else:
        assert sync.error is not None and sync.error[0] is scenario.raises
