"""Continuous batching: results independent of company, admission, cancellation, bounded memory."""

from __future__ import annotations

import asyncio
import random
import resource
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from textgen_server.engine import Engine
from textgen_server.generation import GenerationRequest
from textgen_server.handles import RequestHandle
from textgen_server.sampling import SamplingParams
from textgen_server.scheduler import (
    GenerationFailedError,
    QueueFullError,
    RequestTooLargeError,
    Scheduler,
    SchedulerLimits,
    StepStats,
)
from textgen_server.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return Engine(tiny_model_dir, provider="cpu", slots=32, max_len=512)


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


async def test_prefill_time_is_a_step_stat_only_where_a_prefill_pass_ran(
    engine: Engine, tokenizer: Tokenizer
) -> None:
    """Every step reported the time of its prefill phase, passes or none: the prefill histogram
    counted as many samples as decode steps, nearly all of them of nothing."""
    steps: list[tuple[int, float]] = []
    sched = Scheduler(
        engine,
        tokenizer,
        on_step=lambda stats: steps.append((stats.prefill_positions, stats.prefill_seconds)),
    )
    handles = [sched.submit(r) for r in _requests(3, seed=5)]
    sched.start()
    try:
        await asyncio.gather(*(_drain(h) for h in handles))
    finally:
        await asyncio.to_thread(sched.stop, 0)
    assert any(positions for positions, _ in steps) and any(not positions for positions, _ in steps)
    assert all((seconds > 0) == (positions > 0) for positions, seconds in steps), steps


async def _drain(handle: RequestHandle) -> None:
    async for _ in handle.events():
        pass


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
    for slot, request in enumerate(requests):
        engine.prefill(slot, request.prompt_ids)
    tokens = np.full(32, 5, dtype=np.int64)  # [32]
    lengths = np.array([len(r.prompt_ids) for r in requests], dtype=np.int64)  # [32]
    together = engine.decode(tokens, lengths)  # [32, vocab]
    worst = 0.0
    for slot, request in enumerate(requests):
        engine.prefill(0, request.prompt_ids)
        alone = engine.decode(tokens[:1], lengths[slot : slot + 1])  # [1, vocab]
        worst = max(worst, float(np.abs(alone[0] - together[slot]).max()))
    assert worst < 1e-5


async def test_short_request_is_answered_within_a_few_steps(engine: Engine, tokenizer: Tokenizer) -> None:
    # The step that finished the short request is read on the scheduler's thread, as it happens: read
    # when its event reached this event loop, a loaded machine would add the steps run meanwhile.
    short_handle: list[RequestHandle] = []
    finished_at: list[int] = []

    def on_step(stats: StepStats) -> None:
        if short_handle and short_handle[0].generation.finished and not finished_at:
            finished_at.append(stats.steps)

    limits = SchedulerLimits(max_batch_size=32, max_batch_total_tokens=32 * 512)
    scheduler = Scheduler(engine, tokenizer, limits, on_step=on_step)
    scheduler.start()
    try:
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
        short_handle.append(scheduler.submit(short))
        events = [event async for event in short_handle[0].events()]
        assert len(events) == 1 and events[0].finish_reason is not None
        # A first token goes out before its step ends; the step is counted when it does.
        for _ in range(200):
            if finished_at:
                break
            await asyncio.sleep(0.005)
        assert finished_at, "no step ever ended with the short request finished"
        assert finished_at[0] - steps_before <= 3, (
            f"the short request waited {finished_at[0] - steps_before} steps"
        )
        for handle in handles:
            handle.cancel()
    finally:
        await asyncio.to_thread(scheduler.stop, 0)


async def test_a_first_token_goes_out_before_the_prompts_after_it_are_prefilled(
    engine: Engine, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four prompts sent together are prefilled in one step, one pass each: the first one's first
    token must reach its client before the last pass runs (it waited for all four: a TTFT p50 of 16
    streams as long as their p99). The last prompt's pass waits here until that token has arrived."""
    first_token_arrived = threading.Event()
    real_prefill = engine.prefill

    def last_prompt_waits(slot: int, tokens: Sequence[int], start: int = 0, adapter: int = 0) -> Any:
        if tokens and tokens[-1] == 403:  # the last prompt's pass
            assert first_token_arrived.wait(timeout=10), "the first prompt's token was held back"
        return real_prefill(slot, tokens, start, adapter)

    monkeypatch.setattr(engine, "prefill", last_prompt_waits)
    scheduler = Scheduler(
        engine, tokenizer, SchedulerLimits(max_batch_size=4, max_batch_total_tokens=4 * 512)
    )
    try:
        handles = [
            scheduler.submit(
                GenerationRequest(
                    request_id=f"r{i}",
                    prompt_ids=(1, 7, 400 + i),
                    max_new_tokens=3,
                    sampling=SamplingParams(temperature=0.0),
                )
            )
            for i in range(4)
        ]
        scheduler.start()  # all four queued: the first step finds them together
        first = handles[0].events().__aiter__()
        await asyncio.wait_for(first.__anext__(), timeout=10)
        first_token_arrived.set()
        assert len([event async for event in first]) == 2
        for handle in handles[1:]:
            assert len([event async for event in handle.events()]) == 3
    finally:
        first_token_arrived.set()
        await asyncio.to_thread(scheduler.stop, 0)


async def test_a_prompt_sent_after_a_first_token_gets_only_the_chunk_of_that_step(
    engine: Engine, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step that began idle may prefill `max_batch_prefill_tokens`, but once a first token of it has
    gone out a stream has begun, and a prompt sent then (here by the client that got it) shares only
    what is left of `prefill_chunk_tokens` with the step's earlier prompts. The last of the first four
    prompts' passes waits until the long prompt is queued, so it is admitted within the same step."""
    long_queued = threading.Event()
    real_prefill = engine.prefill

    def last_prompt_waits(slot: int, tokens: Sequence[int], start: int = 0, adapter: int = 0) -> Any:
        if tokens and tokens[-1] == 403:  # the last of the first four prompts
            assert long_queued.wait(timeout=10), "the long prompt was never sent"
        return real_prefill(slot, tokens, start, adapter)

    monkeypatch.setattr(engine, "prefill", last_prompt_waits)
    steps: list[tuple[int, int]] = []  # (prefill tokens, batch size)
    scheduler = Scheduler(
        engine,
        tokenizer,
        SchedulerLimits(max_batch_prefill_tokens=1000, prefill_chunk_tokens=64),
        on_step=lambda st: steps.append((st.prefill_positions, st.batch_size)),
        prefix_cache=False,
    )
    greedy = SamplingParams(temperature=0.0)
    try:
        handles = [
            scheduler.submit(
                GenerationRequest(
                    request_id=f"r{i}", prompt_ids=(1, 7, 400 + i), max_new_tokens=3, sampling=greedy
                )
            )
            for i in range(4)
        ]
        scheduler.start()  # all four queued: the first step finds them together
        await asyncio.wait_for(handles[0].events().__aiter__().__anext__(), timeout=10)
        long = scheduler.submit(
            GenerationRequest(
                request_id="long", prompt_ids=(1, *range(10, 410)), max_new_tokens=1, sampling=greedy
            )
        )
        long_queued.set()
        assert len([event async for event in long.events()]) == 1
        for handle in handles[1:]:
            assert len([event async for event in handle.events()]) == 3
    finally:
        long_queued.set()
        await asyncio.to_thread(scheduler.stop, 0)
    # The first step: four 3-token prompts, then the long one's first 52 tokens (64 in all), and the
    # four streams' second tokens. With the idle budget the long prompt took 400 tokens there.
    assert steps[0] == (64, 4), steps
    assert all(prefill <= 64 for prefill, size in steps if size), steps


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


async def test_the_batch_never_outgrows_the_kv_slots(tiny_model_dir: Path, tokenizer: Tokenizer) -> None:
    small = Engine(tiny_model_dir, provider="cpu", slots=4, max_len=300)
    sizes: list[int] = []
    peaks: list[int] = []

    def observe(stats: StepStats) -> None:
        sizes.append(stats.batch_size)
        peaks.append(stats.kv_positions)

    sched = Scheduler(small, tokenizer, SchedulerLimits(max_batch_size=32), on_step=observe)
    sched.start()
    try:
        requests = _requests(24, seed=3)
        alone = [await _tokens(sched, r) for r in requests[:4]]
        results = await asyncio.gather(*(_tokens(sched, r) for r in requests))
    finally:
        await asyncio.to_thread(sched.stop, 0)
    assert results[:4] == alone
    assert all(len(tokens) >= 1 for tokens in results)
    assert max(sizes) == 4
    assert 0 < max(peaks) <= 4 * 300


class _TimedWaitCounter(threading.Condition):
    """The scheduler's lock, counting the waits with a timeout: the loop's sleeps while it believes
    that every queued request waits for an adapter."""

    def __init__(self) -> None:
        super().__init__()
        self.timed_waits = 0

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is not None:
            self.timed_waits += 1
        return super().wait(timeout)


async def test_queued_requests_take_the_slots_of_a_batch_that_just_ended(
    tiny_model_dir: Path, tokenizer: Tokenizer
) -> None:
    # One slot, three requests: each time the batch empties, the next request is waiting for it.
    # The loop once slept half a second there, as if every queued request waited for an adapter.
    one_slot = Engine(tiny_model_dir, provider="cpu", slots=1, max_len=64)
    sched = Scheduler(one_slot, tokenizer)
    lock = sched._lock = _TimedWaitCounter()
    sched.start()
    greedy = SamplingParams(temperature=0.0)
    requests = [
        GenerationRequest(request_id=f"q{i}", prompt_ids=(1, 9, 10 + i), max_new_tokens=4, sampling=greedy)
        for i in range(3)
    ]
    try:
        results = await asyncio.gather(*(_tokens(sched, r) for r in requests))
    finally:
        await asyncio.to_thread(sched.stop, 0)
    assert all(1 <= len(tokens) <= 4 for tokens in results)
    assert lock.timed_waits == 0


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


async def test_unread_output_holds_its_place_until_read(engine: Engine, tokenizer: Tokenizer) -> None:
    """A finished request whose events nobody read still counts under max_concurrent_requests: a
    client that opens streams and never reads them cannot make the server hold output for more."""
    sched = Scheduler(engine, tokenizer, SchedulerLimits(max_concurrent_requests=2))
    sched.start()
    try:
        unread = [
            sched.submit(GenerationRequest(request_id=f"u{i}", prompt_ids=(1, 5), max_new_tokens=3))
            for i in range(2)
        ]
        for _ in range(500):  # both generated to the end, neither read
            if all(h.generation.finished for h in unread) and sched.running_count == 0:
                break
            await asyncio.sleep(0.01)
        assert sched.running_count == sched.queued_count == 0
        with pytest.raises(QueueFullError, match="2 requests are open"):
            sched.submit(GenerationRequest(request_id="u2", prompt_ids=(1, 5), max_new_tokens=1))
        assert len([event async for event in unread[0].events()]) == 3  # read to the end: its place frees
        later = sched.submit(GenerationRequest(request_id="u3", prompt_ids=(1, 5), max_new_tokens=1))
        unread[1].cancel()  # its client left without reading: its place frees too
        assert len([event async for event in later.events()]) == 1
        sched.submit(GenerationRequest(request_id="u4", prompt_ids=(1, 5), max_new_tokens=1)).cancel()
        sched.submit(GenerationRequest(request_id="u5", prompt_ids=(1, 5), max_new_tokens=1)).cancel()
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


async def test_request_that_can_never_fit_is_refused_at_once(
    tiny_model_dir: Path, tokenizer: Tokenizer
) -> None:
    short_slots = Engine(tiny_model_dir, provider="cpu", slots=2, max_len=64)
    sched = Scheduler(short_slots, tokenizer)
    sched.start()
    try:
        with pytest.raises(RequestTooLargeError, match="64 positions") as caught:
            sched.submit(GenerationRequest(request_id="big", prompt_ids=(1, 5, 6), max_new_tokens=63))
        assert caught.value.field == "max_tokens"
        # The last token is never fed back, so prompt + max_new_tokens - 1 positions fit exactly.
        small = GenerationRequest(
            request_id="ok", prompt_ids=(1, 5, 6), max_new_tokens=62, sampling=SamplingParams(temperature=0)
        )
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

    def failing_once(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("simulated ORT failure")
        return real_prefill(*args, **kwargs)

    monkeypatch.setattr(engine, "prefill", failing_once)
    try:
        request = GenerationRequest(request_id="victim", prompt_ids=(1, 5), max_new_tokens=3)
        with pytest.raises(GenerationFailedError, match="victim"):
            await asyncio.wait_for(_tokens(sched, request), timeout=30)
        again = GenerationRequest(request_id="next", prompt_ids=(1, 5), max_new_tokens=3)
        assert len(await asyncio.wait_for(_tokens(sched, again), timeout=30)) == 3
    finally:
        await asyncio.to_thread(sched.stop, 0)


def _long_prompt_and_streams(
    long_id: str, prompt_tokens: int, stream_tokens: int
) -> tuple[GenerationRequest, list[GenerationRequest]]:
    """A greedy request whose prompt holds `prompt_tokens` tokens (4 new ones), and four greedy
    streams of `stream_tokens` new tokens after 3-token prompts."""
    greedy = SamplingParams(temperature=0.0)
    long = GenerationRequest(
        request_id=long_id, prompt_ids=(1, *range(10, 9 + prompt_tokens)), max_new_tokens=4, sampling=greedy
    )
    streams = [
        GenerationRequest(
            request_id=f"s{i}", prompt_ids=(1, 7, 8 + i), max_new_tokens=stream_tokens, sampling=greedy
        )
        for i in range(4)
    ]
    return long, streams


async def test_failed_prefill_pass_fails_its_request_alone(
    tiny_model_dir: Path, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prompt's pass writes its own slot only: when it fails, the streams decoding beside it go on
    unchanged, and no later prompt starts from what the failed one left in its slot."""
    engine = Engine(tiny_model_dir, provider="cpu", slots=8, max_len=1100)
    limits = SchedulerLimits(max_batch_prefill_tokens=1000, prefill_chunk_tokens=256)
    long, streams = _long_prompt_and_streams("victim", prompt_tokens=991, stream_tokens=40)
    reference = Scheduler(engine, tokenizer, limits, prefix_cache=False)
    reference.start()
    try:
        streams_alone = [await _tokens(reference, r) for r in streams]
        long_alone = await _tokens(reference, long)
    finally:
        await asyncio.to_thread(reference.stop, 0)

    real_prefill = engine.prefill
    failing = True

    def second_pass_fails(slot: int, tokens: Sequence[int], start: int = 0, adapter: int = 0) -> Any:
        if failing and start >= 256:  # the long prompt's second pass; the streams' prompts are short
            raise RuntimeError("simulated failure of the pass")
        return real_prefill(slot, tokens, start, adapter)

    monkeypatch.setattr(engine, "prefill", second_pass_fails)
    reused: list[int] = []
    sched = Scheduler(engine, tokenizer, limits, on_step=lambda st: reused.append(st.reused_positions))
    sched.start()
    try:
        handles = [sched.submit(r) for r in streams]
        events = [h.events().__aiter__() for h in handles]
        firsts = [(await e.__anext__()).token_id for e in events]  # all four are decoding
        with pytest.raises(GenerationFailedError, match="victim"):
            await asyncio.wait_for(_tokens(sched, long), timeout=30)
        together = []
        for first, rest in zip(firsts, events, strict=True):
            together.append([first, *[event.token_id async for event in rest]])
        failing = False
        reused.clear()
        long_again = await asyncio.wait_for(_tokens(sched, long), timeout=30)
    finally:
        await asyncio.to_thread(sched.stop, 0)
    assert together == streams_alone
    assert long_again == long_alone
    assert sum(reused) == 0  # its first 256 positions were written, and are not offered again


async def test_long_prompt_is_prefilled_in_chunks_while_streams_decode(
    tiny_model_dir: Path, tokenizer: Tokenizer
) -> None:
    engine = Engine(tiny_model_dir, provider="cpu", slots=8, max_len=2100)
    passes: list[int] = []  # tokens in each prefill pass
    prefill = engine.prefill

    def counted_prefill(slot: int, tokens: Sequence[int], start: int = 0, adapter: int = 0) -> Any:
        passes.append(len(tokens))
        return prefill(slot, tokens, start, adapter)

    engine.prefill = counted_prefill  # type: ignore[method-assign]
    steps: list[tuple[int, int, int]] = []  # (prefill tokens, batch size, tokens generated)
    limits = SchedulerLimits(max_batch_prefill_tokens=1000, prefill_chunk_tokens=256)
    sched = Scheduler(
        engine,
        tokenizer,
        limits,
        on_step=lambda st: steps.append((st.prefill_positions, st.batch_size, st.tokens)),
        prefix_cache=False,  # the same long prompt runs twice: both times it must be prefilled
    )
    sched.start()
    long, streams = _long_prompt_and_streams("long", prompt_tokens=2008, stream_tokens=60)
    try:
        long_alone = await _tokens(sched, long)
        prefills_alone = [p for p, _, _ in steps if p]
        passes_alone = list(passes)
        steps.clear()
        handles = [sched.submit(r) for r in streams]
        firsts = [await h.events().__aiter__().__anext__() for h in handles]  # all four are decoding
        long_together = await _tokens(sched, long)
        for handle in handles:
            handle.cancel()
    finally:
        await asyncio.to_thread(sched.stop, 0)
    assert all(f.completion_tokens == 1 for f in firsts)
    assert long_together == long_alone
    # Alone, nothing decodes: the prompt goes in chunks of max_batch_prefill_tokens a step, and on
    # the CPU in passes of at most prefill_chunk_tokens.
    assert prefills_alone == [1000, 1000, 8]
    assert passes_alone == [256, 256, 256, 232] * 2 + [8]
    # With streams decoding: chunks of at most 256, and every such step also decoded the streams.
    # (The streams' own prompts, 3 tokens each, may be admitted over more than one step.)
    chunked = [(p, size, tokens) for p, size, tokens in steps if p > 3 * len(streams)]
    assert len(chunked) >= 2000 // 256
    assert all(p <= 256 and size >= 4 and tokens >= 4 for p, size, tokens in chunked), steps


def test_largest_prefill_pass_is_the_chunk_on_the_cpu_and_the_step_budget_on_cuda() -> None:
    limits = SchedulerLimits(max_batch_prefill_tokens=1000, prefill_chunk_tokens=256)
    assert limits.largest_prefill_pass("cpu") == 256
    assert limits.largest_prefill_pass("cuda") == 1000
    # A chunk larger than the step's budget: the budget bounds the pass.
    assert (
        SchedulerLimits(max_batch_prefill_tokens=100, prefill_chunk_tokens=256).largest_prefill_pass("cpu")
        == 100
    )


async def test_cancelled_request_leaves_within_one_step(scheduler: Scheduler) -> None:
    handle = scheduler.submit(
        GenerationRequest(request_id="leaver", prompt_ids=(1, 5, 6), max_new_tokens=500)
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
