"""Continuous batching: results independent of company, admission, cancellation, bounded memory."""

from __future__ import annotations

import asyncio
import random
import resource
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from textgen_server.engine import Engine
from textgen_server.generation import GenerationRequest
from textgen_server.sampling import SamplingParams
from textgen_server.scheduler import (
    GenerationFailedError,
    QueueFullError,
    RequestTooLargeError,
    Scheduler,
    SchedulerLimits,
)
from textgen_server.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return Engine(tiny_model_dir, provider="cpu")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(tiny_model_dir / "tokenizer.json")


@pytest.fixture
async def scheduler(engine: Engine, tokenizer: Tokenizer) -> AsyncIterator[Scheduler]:
    sched = Scheduler(engine, tokenizer, SchedulerLimits(max_batch_size=32, max_batch_total_tokens=32 * 512))
    sched.start()
    yield sched
    await asyncio.to_thread(sched.stop, 0)


def _requests(count: int, seed: int = 0) -> list[GenerationRequest]:
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        prompt = (1, *(rng.randrange(3, 32000) for _ in range(rng.randrange(1, 200))))
        sampling = (
            SamplingParams(temperature=0.0)
            if i % 2
            else SamplingParams(
                temperature=rng.choice([0.6, 1.0, 1.5]),
                top_k=rng.choice([None, 5, 50]),
                top_p=rng.choice([None, 0.9]),
                repetition_penalty=rng.choice([1.0, 1.3]),
                frequency_penalty=rng.choice([0.0, 0.5]),
                seed=rng.randrange(1, 10**9),
            )
        )
        requests.append(
            GenerationRequest(
                request_id=f"r{i}", prompt_ids=prompt, max_new_tokens=rng.randrange(1, 40), sampling=sampling
            )
        )
    return requests


async def _tokens(scheduler: Scheduler, request: GenerationRequest) -> list[int]:
    return [event.token_id async for event in scheduler.submit(request).events()]


async def test_tokens_identical_alone_and_among_31_others(scheduler: Scheduler) -> None:
    requests = _requests(32)
    alone = [await _tokens(scheduler, r) for r in requests]
    together = await asyncio.gather(*(_tokens(scheduler, r) for r in requests))
    assert [len(t) for t in alone] == [len(t) for t in together]
    assert together == alone


def test_batched_logits_differ_from_alone_by_rounding_only(engine: Engine) -> None:
    """Why equality above is by result, not by construction: ORT's GEMM kernels treat rows of a
    larger batch in other blocks, which changes the summation order. The difference stays at float32
    rounding level; greedy can only flip on a near-tie within it."""
    requests = _requests(32, seed=1)
    _, logits = engine.prefill([r.prompt_ids for r in requests])  # [32, vocab]
    worst = 0.0
    for row, request in enumerate(requests):
        _, alone = engine.prefill([request.prompt_ids])
        worst = max(worst, float(np.abs(alone[0] - logits[row]).max()))
    assert worst < 1e-5


async def test_short_request_is_answered_within_a_few_steps(scheduler: Scheduler) -> None:
    long_requests = [
        GenerationRequest(
            request_id=f"long{i}",
            prompt_ids=(1, 100 + i),
            max_new_tokens=300,
            sampling=SamplingParams(temperature=0.0),
        )
        for i in range(16)
    ]
    handles = [scheduler.submit(r) for r in long_requests]
    streams = [h.events().__aiter__() for h in handles]
    for stream in streams:  # every long request is decoding
        await stream.__anext__()
    steps_before = scheduler.stats.steps
    short = GenerationRequest(request_id="short", prompt_ids=(1, 42), max_new_tokens=1)
    events = [event async for event in scheduler.submit(short).events()]
    steps_taken = scheduler.stats.steps - steps_before
    assert len(events) == 1 and events[0].finish_reason is not None
    assert steps_taken <= 3, f"the short request waited {steps_taken} steps"
    for handle in handles:
        handle.cancel()


async def test_random_cancellations_free_every_slot(scheduler: Scheduler) -> None:
    rng = random.Random(7)

    async def cancel_after(request: GenerationRequest, after: int) -> None:
        handle = scheduler.submit(request)
        seen = 0
        async for _ in handle.events():
            seen += 1
            if seen >= after:
                handle.cancel()
                break

    async def round_of(count: int) -> None:
        requests = [
            GenerationRequest(
                request_id=f"c{i}", prompt_ids=(1, *range(5, 5 + rng.randrange(1, 100))), max_new_tokens=200
            )
            for i in range(count)
        ]
        await asyncio.gather(*(cancel_after(r, rng.randrange(1, 30)) for r in requests))
        for _ in range(200):
            if scheduler.running_count == 0 and scheduler.queued_count == 0:
                break
            await asyncio.sleep(0.01)

    await round_of(100)  # warm up: ORT's arena grows to its working size once
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    await round_of(100)
    assert scheduler.running_count == 0 and scheduler.queued_count == 0
    assert scheduler.kv_positions == 0
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline
    assert grown_kib < 64 * 1024, f"peak memory grew by {grown_kib} KiB over the second round"


async def test_kv_budget_is_never_exceeded(engine: Engine, tokenizer: Tokenizer) -> None:
    budget = 4 * 300
    peaks: list[int] = []
    sched = Scheduler(
        engine,
        tokenizer,
        SchedulerLimits(max_batch_size=32, max_batch_total_tokens=budget),
        on_step=lambda stats: peaks.append(stats.kv_positions),
    )
    sched.start()
    try:
        requests = _requests(24, seed=3)
        results = await asyncio.gather(*(_tokens(sched, r) for r in requests))
    finally:
        await asyncio.to_thread(sched.stop, 0)
    assert all(len(tokens) >= 1 for tokens in results)
    assert 0 < max(peaks) <= budget


async def test_backpressure_past_max_concurrent_requests(engine: Engine, tokenizer: Tokenizer) -> None:
    sched = Scheduler(engine, tokenizer, SchedulerLimits(max_concurrent_requests=3))
    sched.start()
    try:
        handles = [
            sched.submit(GenerationRequest(request_id=f"b{i}", prompt_ids=(1, 5), max_new_tokens=100))
            for i in range(3)
        ]
        with pytest.raises(QueueFullError, match="max_concurrent_requests=3"):
            sched.submit(GenerationRequest(request_id="b3", prompt_ids=(1, 5), max_new_tokens=1))
        for handle in handles:
            handle.cancel()
    finally:
        await asyncio.to_thread(sched.stop, 1)


async def test_step_stats_reach_the_observer(engine: Engine, tokenizer: Tokenizer) -> None:
    seen: list[tuple[int, int, float]] = []
    sched = Scheduler(
        engine, tokenizer, on_step=lambda st: seen.append((st.batch_size, st.steps, st.decode_seconds))
    )
    sched.start()
    try:
        await asyncio.gather(*(_tokens(sched, r) for r in _requests(4, seed=5)))
    finally:
        await asyncio.to_thread(sched.stop, 0)
    assert [steps for _, steps, _ in seen] == list(range(1, len(seen) + 1))
    assert max(size for size, _, _ in seen) >= 2
    assert all(seconds >= 0 for _, _, seconds in seen) and any(seconds > 0 for _, _, seconds in seen)


async def test_request_that_can_never_fit_is_refused_at_once(engine: Engine, tokenizer: Tokenizer) -> None:
    sched = Scheduler(engine, tokenizer, SchedulerLimits(max_batch_total_tokens=64))
    sched.start()
    try:
        with pytest.raises(RequestTooLargeError, match="max_batch_total_tokens=64") as caught:
            sched.submit(GenerationRequest(request_id="big", prompt_ids=(1, 5, 6), max_new_tokens=62))
        assert caught.value.field == "max_tokens"
        small = GenerationRequest(request_id="ok", prompt_ids=(1, 5, 6), max_new_tokens=61)
        assert len(await _tokens(sched, small)) >= 1
    finally:
        await asyncio.to_thread(sched.stop, 0)


async def test_failed_step_fails_its_requests_and_the_server_goes_on(
    engine: Engine, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    sched = Scheduler(engine, tokenizer)
    sched.start()
    real_prefill = engine.prefill
    calls = 0

    def failing_once(prompts: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("simulated ORT failure")
        return real_prefill(prompts)  # type: ignore[arg-type]

    monkeypatch.setattr(engine, "prefill", failing_once)
    try:
        request = GenerationRequest(request_id="victim", prompt_ids=(1, 5), max_new_tokens=3)
        with pytest.raises(GenerationFailedError, match="victim"):
            await asyncio.wait_for(_tokens(sched, request), timeout=30)
        again = GenerationRequest(request_id="next", prompt_ids=(1, 5), max_new_tokens=3)
        assert len(await asyncio.wait_for(_tokens(sched, again), timeout=30)) == 3
    finally:
        await asyncio.to_thread(sched.stop, 0)


async def test_padded_prefill_stays_within_the_prefill_budget(engine: Engine, tokenizer: Tokenizer) -> None:
    """One long prompt among short ones: the left-padded prefill must count rows x longest prompt."""
    prefills: list[int] = []
    sched = Scheduler(
        engine,
        tokenizer,
        SchedulerLimits(max_batch_prefill_tokens=1000),
        on_step=lambda stats: prefills.append(stats.prefill_positions),
    )
    sched.start()
    try:
        long = GenerationRequest(request_id="long", prompt_ids=(1, *range(10, 509)), max_new_tokens=2)
        shorts = [
            GenerationRequest(request_id=f"s{i}", prompt_ids=(1, 7, 8 + i), max_new_tokens=2)
            for i in range(20)
        ]
        await asyncio.gather(*(_tokens(sched, r) for r in [long, *shorts]))
    finally:
        await asyncio.to_thread(sched.stop, 0)
    assert max(prefills) <= 1000
    assert sum(1 for p in prefills if p) >= 2  # the short prompts could not all ride with the long one


async def test_cancelled_request_leaves_within_one_step(scheduler: Scheduler) -> None:
    handle = scheduler.submit(
        GenerationRequest(request_id="leaver", prompt_ids=(1, 5, 6), max_new_tokens=3000)
    )
    stream = handle.events().__aiter__()
    for _ in range(3):
        await stream.__anext__()
    steps_at_cancel = scheduler.stats.steps
    handle.cancel()
    for _ in range(2000):
        if scheduler.running_count == 0:
            break
        await asyncio.sleep(0.001)
    assert scheduler.running_count == 0 and scheduler.kv_positions == 0
    # The step under way when the flag was set may finish; the next one starts by retiring it.
    assert scheduler.stats.steps - steps_at_cancel <= 2
