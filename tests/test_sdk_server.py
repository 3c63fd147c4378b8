"""The SDK against a real in-process server: abandoned streams stop the generation, a full server
pushes back and the SDK comes back when told, request ids match the server's logs, and messages
over the size cap are refused at once."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_harness import ServerThread
from textgen import AsyncClient, Client, Message, ResourceExhaustedError
from textgen_server.scheduler import Scheduler, SchedulerLimits

# Greedy on the seeded tiny demo, this request runs to its max_tokens (about 0.7 s on 2 quiet cores):
# long enough that a stream dropped after one chunk is still running when the test looks. Sampled, it
# may end on EOS early, and the test would see an idle server for the wrong reason.
LONG_PROMPT = "Count to a thousand"
LONG_MAX_TOKENS = 3000


def _wait_idle(scheduler: Scheduler, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while scheduler.running_count + scheduler.queued_count and time.monotonic() < deadline:
        time.sleep(0.005)


@pytest.fixture
def scheduler(server: ServerThread) -> Scheduler:
    scheduler = server.server.scheduler
    assert scheduler is not None
    _wait_idle(scheduler)
    return scheduler


def test_an_abandoned_stream_stops_the_server(server: ServerThread, scheduler: Scheduler) -> None:
    with Client(server.target) as client:

        def read_one_chunk() -> None:
            for _chunk in client.generate(
                LONG_PROMPT, max_tokens=LONG_MAX_TOKENS, temperature=0, stream=True
            ):
                break  # no `with`, no close(): the stream is dropped when this frame ends

        steps = scheduler.stats.steps
        read_one_chunk()
        _wait_idle(scheduler)
        assert scheduler.running_count == 0
        assert scheduler.stats.steps - steps < 200  # far from its 3000 tokens


def test_the_long_request_runs_to_its_max_tokens(server: ServerThread) -> None:
    with Client(server.target) as client:
        assert (
            client.generate(LONG_PROMPT, max_tokens=LONG_MAX_TOKENS, temperature=0).finish_reason == "length"
        )


@pytest.fixture
def no_automatic_gc() -> Iterator[None]:
    """The cyclic collector runs only when the test calls it."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.usefixtures("no_automatic_gc")
def test_a_stream_in_a_reference_cycle_stops_when_collected(
    server: ServerThread, scheduler: Scheduler
) -> None:
    with Client(server.target) as client:
        stream = client.generate(LONG_PROMPT, max_tokens=LONG_MAX_TOKENS, temperature=0, stream=True)
        next(stream)
        holder: dict[str, object] = {"stream": stream}
        holder["self"] = holder  # only the cyclic collector can free this one
        del stream, holder
        time.sleep(0.2)
        assert scheduler.running_count == 1  # still generating: nothing has collected it yet
        gc.collect()
        _wait_idle(scheduler)
        assert scheduler.running_count == 0


async def test_an_abandoned_async_stream_stops_the_server(server: ServerThread, scheduler: Scheduler) -> None:
    async with AsyncClient(server.target) as client:

        async def read_one_chunk() -> None:
            async for _chunk in await client.generate(
                LONG_PROMPT, max_tokens=LONG_MAX_TOKENS, temperature=0, stream=True
            ):
                break

        await read_one_chunk()
        gc.collect()
        await asyncio.to_thread(_wait_idle, scheduler)
        assert scheduler.running_count == 0


@pytest.mark.usefixtures("no_automatic_gc")
async def test_an_async_stream_in_a_reference_cycle_stops_when_collected(
    server: ServerThread, scheduler: Scheduler
) -> None:
    async with AsyncClient(server.target) as client:
        stream = await client.generate(LONG_PROMPT, max_tokens=LONG_MAX_TOKENS, temperature=0, stream=True)
        await stream.__anext__()
        holder: dict[str, object] = {"stream": stream}
        holder["self"] = holder
        del stream, holder
        await asyncio.sleep(0.2)
        assert scheduler.running_count == 1
        gc.collect()
        await asyncio.to_thread(_wait_idle, scheduler)
        assert scheduler.running_count == 0


@pytest.fixture
def full_server(tiny_model_dir: Path) -> Iterator[ServerThread]:
    harness = ServerThread(tiny_model_dir, limits=SchedulerLimits(max_concurrent_requests=1))
    yield harness
    harness.stop(grace=0)


def test_a_full_server_pushes_back_and_the_sdk_comes_back(full_server: ServerThread) -> None:
    with Client(full_server.target, max_retries=0) as client:
        stream = client.generate("Keep going", max_tokens=3000, temperature=0, stream=True)
        next(stream)
        with pytest.raises(ResourceExhaustedError) as caught:  # no retries allowed: the refusal itself
            client.generate("Hi", max_tokens=2)
        assert dict(caught.value.trailing_metadata)["grpc-retry-pushback-ms"] == "250"
        # With retries, the call waits as told and gets in once the first one is done.
        threading.Timer(0.1, stream.close).start()
        with Client(full_server.target, max_retries=5) as patient:
            assert patient.generate("Hi", max_tokens=2).usage.completion_tokens == 2


def test_the_request_id_is_the_one_the_server_logs(
    server: ServerThread, scheduler: Scheduler, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="textgen_server.requests")
    with Client(server.target) as client:
        completion = client.generate("Hi", max_tokens=2)
        with client.generate("Hi", max_tokens=2, stream=True) as stream:
            list(stream)
    deadline = time.monotonic() + 5
    while len(caplog.records) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    lines = [record.getMessage() for record in caplog.records]
    assert completion.request_id and any(f"id={completion.request_id} " in line for line in lines)
    assert any(f"id={stream.request_id} method=GenerateStream" in line for line in lines)


def test_a_message_over_the_size_cap_is_refused_at_once(server: ServerThread) -> None:
    messages: list[Message] = [{"role": "user", "content": "x" * 6000}] * 200  # 1.2 MB
    with Client(server.target, max_retries=3) as client, pytest.raises(ResourceExhaustedError) as caught:
        client.chat(messages, max_tokens=1)
    assert "larger than max" in caught.value.message
