"""Retries: UNAVAILABLE, and RESOURCE_EXHAUSTED when the server sends a retry pushback, at most
max_retries times, with capped exponential backoff and jitter (or the pushback's wait), and never
once a stream has yielded a chunk. The policy is one function (unit tests); both clients use it
(tests against the fake server)."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import pytest
import textgen._async_client
import textgen._channel
import textgen._client
from _fake_server import FakeTextGeneration, serve
from textgen import (
    APIStatusError,
    AsyncClient,
    AsyncStream,
    Client,
    ResourceExhaustedError,
    Stream,
    UnavailableError,
    _retry,
)
from textgen._retry import INITIAL_BACKOFF, JITTER, MAX_BACKOFF, MAX_PUSHBACK, backoff, retry_delay

OTHER_CODES = [
    code
    for code in grpc.StatusCode
    if code not in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
]
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


class _Fixed(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def random(self) -> float:
        return self.value


# -- the backoff function -----------------------------------------------------------------------


def test_backoff_doubles_from_the_initial_wait_up_to_the_cap() -> None:
    no_jitter = _Fixed(0.0)
    assert [backoff(n, rng=no_jitter) for n in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert backoff(10_000, rng=no_jitter) == MAX_BACKOFF  # no overflow for absurd counts


def test_backoff_is_bounded_and_jittered() -> None:
    rng = random.Random(1234)
    for retries_done in range(12):
        cap = min(INITIAL_BACKOFF * 2**retries_done, MAX_BACKOFF)
        waits = [backoff(retries_done, rng=rng) for _ in range(200)]
        assert all((1 - JITTER) * cap < wait <= cap for wait in waits)
        assert len(set(waits)) > 150  # spread out, so clients that failed together do not retry together
        assert max(waits) - min(waits) > JITTER * cap * 0.8


def test_backoff_is_reproducible_with_a_seeded_rng() -> None:
    first = [backoff(n, rng=random.Random(7)) for n in range(5)]
    assert first == [backoff(n, rng=random.Random(7)) for n in range(5)]
    assert backoff(0, rng=_Fixed(0.999999)) == pytest.approx(INITIAL_BACKOFF * (1 - JITTER), rel=1e-5)


# -- the decision -------------------------------------------------------------------------------


def test_unavailable_is_retried_up_to_max_retries() -> None:
    rng = random.Random(0)
    delays = [retry_delay(grpc.StatusCode.UNAVAILABLE, n, max_retries=3, rng=rng) for n in range(5)]
    assert [d is not None for d in delays] == [True, True, True, False, False]
    assert retry_delay(grpc.StatusCode.UNAVAILABLE, 0, max_retries=0) is None


@pytest.mark.parametrize("code", OTHER_CODES, ids=lambda c: c.name)
def test_no_other_code_is_retried(code: grpc.StatusCode) -> None:
    assert retry_delay(code, 0, max_retries=5) is None


def test_a_stream_that_yielded_is_never_retried() -> None:
    assert retry_delay(grpc.StatusCode.UNAVAILABLE, 0, max_retries=5, yielded=True) is None
    assert retry_delay(EXHAUSTED, 0, max_retries=5, yielded=True, pushback="10") is None


@pytest.mark.parametrize("code", [EXHAUSTED, grpc.StatusCode.UNAVAILABLE], ids=lambda c: c.name)
def test_a_pushback_is_the_wait(code: grpc.StatusCode) -> None:
    assert retry_delay(code, 0, max_retries=2, pushback="250") == 0.25
    assert retry_delay(code, 1, max_retries=2, pushback=" 0 ") == 0.0
    assert retry_delay(code, 0, max_retries=2, pushback=str(10**9)) == MAX_PUSHBACK
    assert retry_delay(code, 2, max_retries=2, pushback="250") is None  # retries still count


@pytest.mark.parametrize("pushback", ["-1", "soon", "", "1.5"])
def test_a_negative_or_garbled_pushback_means_never(pushback: str) -> None:
    assert retry_delay(EXHAUSTED, 0, max_retries=5, pushback=pushback) is None
    assert retry_delay(grpc.StatusCode.UNAVAILABLE, 0, max_retries=5, pushback=pushback) is None


def test_resource_exhausted_without_a_pushback_is_final() -> None:
    # gRPC's own size limits say RESOURCE_EXHAUSTED without a hint: retrying cannot help.
    assert retry_delay(EXHAUSTED, 0, max_retries=5) is None


# -- the clients --------------------------------------------------------------------------------


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The retries_done of every backoff the clients asked for; the wait itself is zero."""
    asked: list[int] = []

    def no_wait(retries_done: int, **_: object) -> float:
        asked.append(retries_done)
        return 0.0

    monkeypatch.setattr(_retry, "backoff", no_wait)
    return asked


@pytest.fixture
def fake() -> Iterator[FakeTextGeneration]:
    with serve() as server:
        yield server


def test_sync_unary_recovers_after_unavailable(fake: FakeTextGeneration, waits: list[int]) -> None:
    fake.fail(grpc.StatusCode.UNAVAILABLE, times=2)
    with Client(fake.target, max_retries=2) as client:
        assert client.generate("Hi").response == "Hi"
        assert client.model_info().vocab_size == 32000
    assert (fake.calls, waits) == (4, [0, 1])


async def test_async_unary_recovers_after_unavailable(fake: FakeTextGeneration, waits: list[int]) -> None:
    fake.fail(grpc.StatusCode.UNAVAILABLE, times=2)
    async with AsyncClient(fake.target, max_retries=2) as client:
        assert (await client.generate("Hi")).response == "Hi"
        assert (await client.model_info()).vocab_size == 32000
    assert (fake.calls, waits) == (4, [0, 1])


@pytest.mark.parametrize("max_retries", [0, 1, 3])
def test_sync_gives_up_after_max_retries(
    fake: FakeTextGeneration, waits: list[int], max_retries: int
) -> None:
    fake.fail(grpc.StatusCode.UNAVAILABLE, times=10)
    with Client(fake.target, max_retries=max_retries) as client, pytest.raises(UnavailableError):
        client.generate("Hi")
    assert fake.calls == max_retries + 1
    assert waits == list(range(max_retries))


@pytest.mark.parametrize("max_retries", [0, 1, 3])
async def test_async_gives_up_after_max_retries(
    fake: FakeTextGeneration, waits: list[int], max_retries: int
) -> None:
    fake.fail(grpc.StatusCode.UNAVAILABLE, times=10)
    async with AsyncClient(fake.target, max_retries=max_retries) as client:
        with pytest.raises(UnavailableError):
            await client.generate("Hi")
    assert fake.calls == max_retries + 1


NOT_RETRIED = [
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # without a pushback
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.DEADLINE_EXCEEDED,
]


@pytest.mark.parametrize("code", NOT_RETRIED, ids=lambda c: c.name)
def test_sync_raises_other_codes_at_once(
    fake: FakeTextGeneration, waits: list[int], code: grpc.StatusCode
) -> None:
    fake.fail(code, times=2)
    with Client(fake.target, max_retries=5) as client:
        with pytest.raises(APIStatusError) as unary:
            client.generate("Hi")
        with pytest.raises(APIStatusError) as stream:
            next(client.generate("Hi", stream=True))
    assert unary.value.code == stream.value.code == code
    assert (fake.calls, waits) == (2, [])


@pytest.mark.parametrize("code", NOT_RETRIED, ids=lambda c: c.name)
async def test_async_raises_other_codes_at_once(
    fake: FakeTextGeneration, waits: list[int], code: grpc.StatusCode
) -> None:
    fake.fail(code, times=2)
    async with AsyncClient(fake.target, max_retries=5) as client:
        with pytest.raises(APIStatusError) as unary:
            await client.generate("Hi")
        with pytest.raises(APIStatusError) as stream:
            await (await client.generate("Hi", stream=True)).__anext__()
    assert unary.value.code == stream.value.code == code
    assert (fake.calls, waits) == (2, [])


def test_sync_stream_is_retried_before_its_first_chunk(fake: FakeTextGeneration, waits: list[int]) -> None:
    fake.fail(grpc.StatusCode.UNAVAILABLE, times=2)
    with Client(fake.target) as client:
        stream = client.generate("a b c", stream=True)
        assert isinstance(stream, Stream)
        assert "".join(chunk.response for chunk in stream) == "a b c"
    assert (fake.calls, waits) == (3, [0, 1])


async def test_async_stream_is_retried_before_its_first_chunk(
    fake: FakeTextGeneration, waits: list[int]
) -> None:
    fake.fail(grpc.StatusCode.UNAVAILABLE, times=2)
    async with AsyncClient(fake.target) as client:
        stream = await client.generate("a b c", stream=True)
        assert isinstance(stream, AsyncStream)
        assert "".join([chunk.response async for chunk in stream]) == "a b c"
    assert (fake.calls, waits) == (3, [0, 1])


def test_sync_stream_is_never_replayed_after_a_chunk(fake: FakeTextGeneration, waits: list[int]) -> None:
    fake.fail_stream_after = 2
    received: list[str] = []
    with Client(fake.target, max_retries=5) as client, pytest.raises(UnavailableError, match="draining"):
        for chunk in client.generate("a b c d", stream=True):
            received.append(chunk.response)
    assert received == ["a", " b"]
    assert (fake.calls, waits) == (1, [])


async def test_async_stream_is_never_replayed_after_a_chunk(
    fake: FakeTextGeneration, waits: list[int]
) -> None:
    fake.fail_stream_after = 2
    received: list[str] = []
    async with AsyncClient(fake.target, max_retries=5) as client:
        with pytest.raises(UnavailableError, match="draining"):
            async for chunk in await client.generate("a b c d", stream=True):
                received.append(chunk.response)
    assert received == ["a", " b"]
    assert (fake.calls, waits) == (1, [])


def test_the_fake_server_holds_its_port_alone(fake: FakeTextGeneration) -> None:
    """Another server with SO_REUSEPORT (grpc's default) cannot bind the fake's port and take some of
    its clients; a test's calls reach its own server only."""
    intruder = grpc.server(ThreadPoolExecutor(max_workers=1))
    with pytest.raises(RuntimeError, match="Failed to bind"):
        intruder.add_insecure_port(fake.target)
    intruder.stop(None)


def test_connection_refused_is_unavailable_and_retried(waits: list[int]) -> None:
    with serve() as gone:
        target = gone.target
    with Client(target, max_retries=2, timeout=5) as client, pytest.raises(UnavailableError):
        client.generate("Hi")
    assert waits == [0, 1]


@pytest.fixture
def dns_fails_first(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """DNS answers 'localhost' with 127.0.0.1, but only from its second question on."""
    asked: list[str] = []

    def getaddrinfo(host: str, port: int, **_: object) -> list[tuple[object, ...]]:
        asked.append(host)
        if host != "localhost" or len(asked) == 1:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(textgen._channel.socket, "getaddrinfo", getaddrinfo)
    return asked


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_a_list_target_dns_does_not_resolve_is_unavailable_and_retried(
    fake: FakeTextGeneration, waits: list[int], dns_fails_first: list[str], stream: bool
) -> None:
    port = fake.target.rpartition(":")[2]

    def generate(client: Client) -> str:
        if stream:
            with client.generate("Hi", stream=True) as chunks:
                return "".join(chunk.response for chunk in chunks)
        return client.generate("Hi").response

    with Client([f"localhost:{port}"], max_retries=1, timeout=5) as client:
        assert generate(client) == "Hi"  # resolved on the retry: the channel was not kept
    unresolved = Client([f"nosuchhost.invalid:{port}"], max_retries=1, timeout=5)
    with unresolved, pytest.raises(UnavailableError, match="cannot resolve 'nosuchhost.invalid'"):
        generate(unresolved)
    assert waits == [0, 0]


async def test_the_async_client_retries_a_list_target_dns_does_not_resolve(
    fake: FakeTextGeneration, waits: list[int], dns_fails_first: list[str]
) -> None:
    port = fake.target.rpartition(":")[2]
    async with AsyncClient([f"localhost:{port}"], max_retries=1, timeout=5) as client:
        assert (await client.generate("Hi")).response == "Hi"
        async with await client.generate("Hi", stream=True) as chunks:
            assert "".join([chunk.response async for chunk in chunks]) == "Hi"
    async with AsyncClient([f"nosuchhost.invalid:{port}"], max_retries=1, timeout=5) as client:
        with pytest.raises(UnavailableError, match="cannot resolve 'nosuchhost.invalid'"):
            await client.generate("Hi")
    assert waits == [0, 0]


# -- pushback: the wait is the server's --------------------------------------------------------


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every wait the clients made between attempts (they return at once)."""
    waits: list[float] = []

    async def async_sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(textgen._client, "time", SimpleNamespace(sleep=waits.append))
    monkeypatch.setattr(
        textgen._async_client,
        "asyncio",
        SimpleNamespace(sleep=async_sleep, get_running_loop=asyncio.get_running_loop),
    )
    return waits


def test_sync_waits_as_long_as_the_server_says(fake: FakeTextGeneration, slept: list[float]) -> None:
    fake.fail(EXHAUSTED, times=2, pushback_ms="1500")
    with Client(fake.target, max_retries=2) as client:
        assert client.generate("Hi").response == "Hi"
    assert (fake.calls, slept) == (3, [1.5, 1.5])
    fake.fail(EXHAUSTED, times=1, pushback_ms="40")
    with Client(fake.target, max_retries=2) as client:
        assert "".join(chunk.response for chunk in client.generate("a b", stream=True)) == "a b"
    assert slept[2:] == [0.04]


async def test_async_waits_as_long_as_the_server_says(fake: FakeTextGeneration, slept: list[float]) -> None:
    fake.fail(EXHAUSTED, times=2, pushback_ms="1500")
    async with AsyncClient(fake.target, max_retries=2) as client:
        assert (await client.generate("Hi")).response == "Hi"
        fake.fail(EXHAUSTED, times=1, pushback_ms="40")
        assert "".join([chunk.response async for chunk in await client.generate("a b", stream=True)]) == "a b"
    assert (fake.calls, slept) == (5, [1.5, 1.5, 0.04])


def test_a_full_server_that_stays_full_is_resource_exhausted(
    fake: FakeTextGeneration, slept: list[float]
) -> None:
    fake.fail(EXHAUSTED, times=5, pushback_ms="10")
    with Client(fake.target, max_retries=2) as client, pytest.raises(ResourceExhaustedError) as caught:
        client.generate("Hi")
    assert (fake.calls, slept) == (3, [0.01, 0.01])
    assert caught.value.request_id == fake.metadata[0]["x-request-id"] == fake.metadata[2]["x-request-id"]
