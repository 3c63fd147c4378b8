"""A request's trouble stays its own: cancels mid-prefill, a row whose own step raises, failed steps.

Regressions for issue 14's causes 1 and 5 and its per-row isolation, at the scheduler (the gRPC
reproductions are in tests/test_server.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from textgen_server import scheduler as scheduler_module
from textgen_server.engine import Engine
from textgen_server.generation import GenerationRequest
from textgen_server.handles import RequestHandle
from textgen_server.sampling import SamplingParams
from textgen_server.scheduler import GenerationFailedError, PassOutOfMemoryError, Scheduler, StepStats
from textgen_server.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return Engine(tiny_model_dir, provider="cpu")


@pytest.fixture
async def scheduler(engine: Engine, tokenizer: Tokenizer) -> AsyncIterator[Scheduler]:
    sched = Scheduler(engine, tokenizer)
    sched.start()
    yield sched
    await asyncio.to_thread(sched.stop, 0)


def _request(request_id: str, prompt: tuple[int, ...], max_new_tokens: int) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        prompt_ids=prompt,
        max_new_tokens=max_new_tokens,
        sampling=SamplingParams(temperature=0.0),
    )


async def _tokens(handle: RequestHandle) -> list[int]:
    return [event.token_id async for event in handle.events()]


async def test_cancel_during_prefill_leaves_the_running_batch_untouched(
    scheduler: Scheduler, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cause 1: the cancelled row got no first token but was decoded anyway, failing every row."""
    steady = _request("steady", (1, 5, 6, 7), 40)
    expected = await _tokens(scheduler.submit(steady))
    leaver = _request("leaver", (1, *range(100, 400)), 4)
    leaver_handle: list[RequestHandle] = []
    real_prefill = engine.prefill

    def cancel_while_prefilling(*args: Any, **kwargs: Any) -> Any:
        result = real_prefill(*args, **kwargs)
        if leaver_handle:
            leaver_handle[0].cancel()  # lands after the forward pass, before its first token is chosen
        return result

    monkeypatch.setattr(engine, "prefill", cancel_while_prefilling)
    running = scheduler.submit(steady)
    stream = running.events().__aiter__()
    first = [(await stream.__anext__()).token_id]  # steady is in the running batch now
    leaver_handle.append(scheduler.submit(leaver))
    rest = [event.token_id async for event in stream]
    assert first + rest == expected
    assert await _tokens(leaver_handle[0]) == []  # closed quietly: its client is gone
    assert scheduler.running_count == 0 and scheduler.queued_count == 0


async def test_a_row_whose_own_step_raises_fails_alone(scheduler: Scheduler) -> None:
    requests = [_request(f"r{i}", (1, 9, 10 + i), 30) for i in range(4)]
    alone = [await _tokens(scheduler.submit(r)) for r in requests]
    handles = [scheduler.submit(r) for r in requests]
    victim = handles[2].generation
    real_step = victim.step

    def step_that_breaks(logits: Any) -> Any:
        if victim.completion_tokens == 5:
            raise IndexError("simulated bug in this row's sampling")
        return real_step(logits)

    victim.step = step_that_breaks  # type: ignore[method-assign]
    results = await asyncio.gather(*(_tokens(h) for h in handles), return_exceptions=True)
    assert isinstance(results[2], GenerationFailedError) and "r2" in str(results[2])
    assert [results[i] for i in (0, 1, 3)] == [alone[i] for i in (0, 1, 3)]
    assert scheduler.running_count == 0


# What onnxruntime's arena raises when an allocation fails (CUDA's and the CPU's alike).
_ORT_OUT_OF_MEMORY = (
    "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running MatMul "
    "node. Status Message: bfc_arena.cc:376 Failed to allocate memory for requested buffer of size 65536"
)


@dataclass
class _Passes:
    """The decode passes a scheduler ran, in order: each batch pass's rows, each part's pass's
    (first slot, rows)."""

    batch: list[int] = field(default_factory=list)
    parts: list[tuple[int, int]] = field(default_factory=list)


def _batch_passes_fail(
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    part_fails: Callable[[int, int], bool] = lambda first_slot, rows: False,
    batch_fails: Callable[[int], bool] = lambda rows: True,
) -> _Passes:
    """A batch decode pass runs out of memory where `batch_fails(rows)` (every one, by default: the
    whole batch's, say), and so does a part's pass where `part_fails(first slot, rows)`."""
    real_decode, real_decode_slots = engine.decode, engine.decode_slots
    passes = _Passes()

    def decode(tokens: Any, *args: Any, **kwargs: Any) -> Any:
        passes.batch.append(len(tokens))
        if batch_fails(len(tokens)):
            raise RuntimeError(_ORT_OUT_OF_MEMORY)
        return real_decode(tokens, *args, **kwargs)

    def decode_slots(first_slot: int, tokens: Any, lengths: Any, adapters: Any) -> Any:
        passes.parts.append((first_slot, len(tokens)))
        if part_fails(first_slot, len(tokens)):
            raise RuntimeError(_ORT_OUT_OF_MEMORY)
        return real_decode_slots(first_slot, tokens, lengths, adapters)

    monkeypatch.setattr(engine, "decode", decode)
    monkeypatch.setattr(engine, "decode_slots", decode_slots)
    return passes


async def _run_together(
    sched: Scheduler, requests: list[GenerationRequest]
) -> list[list[int] | BaseException]:
    """`requests` queued before `sched` starts, so that they join in its first step and decode
    together; each one's tokens, or the error it ended with."""
    handles = [sched.submit(r) for r in requests]
    sched.start()
    try:
        results = await asyncio.gather(*(_tokens(h) for h in handles), return_exceptions=True)
    finally:
        await asyncio.to_thread(sched.stop, 0)
    return results


async def test_a_batch_out_of_memory_at_every_step_is_decoded_in_two_halves(
    scheduler: Scheduler,
    engine: Engine,
    tokenizer: Tokenizer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """When the batch's decode pass fails (out of memory for the whole batch, say), its rows are
    decoded in two halves, a pass each, and every row gets the tokens it gets alone (it was a pass a
    row, before that every row of the pass failed). Tried at every step, the batch pass fails at
    every step, and logs its traceback once (it logged one a step)."""
    monkeypatch.setattr(scheduler_module, "BATCH_PASS_RETRY_SECONDS", 0.0)  # tried again every step
    requests = [_request(f"r{i}", (1, 5, 6 + i), 30) for i in range(4)]
    alone = [await _tokens(scheduler.submit(r)) for r in requests]
    passes = _batch_passes_fail(engine, monkeypatch)
    failed_passes: list[tuple[str, str]] = []
    sched = Scheduler(engine, tokenizer, on_step=lambda stats: failed_passes.extend(stats.failed_passes))
    results = await _run_together(sched, requests)
    assert results == alone
    assert passes.batch == [4] * 29  # every token after the first
    assert failed_passes == [("decode", "out_of_memory")] * 29
    assert passes.parts == [(0, 2), (2, 2)] * 29  # two passes a step, whatever the batch's size
    batch_failures = [
        r for r in caplog.records if "rows failed; decoding its rows in parts" in r.getMessage()
    ]
    assert len(batch_failures) == 1 and batch_failures[0].exc_info is not None


async def test_a_batch_of_one_whose_pass_fails_runs_its_row_once_more_alone(
    scheduler: Scheduler, engine: Engine, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    request = _request("one", (1, 5, 6), 20)
    alone = await _tokens(scheduler.submit(request))
    passes = _batch_passes_fail(engine, monkeypatch)
    results = await _run_together(Scheduler(engine, tokenizer), [request])
    assert results == [alone]
    assert passes.parts == [(0, 1)] * 19  # every token after the first: its own pass, which did not fail


async def test_a_batch_whose_pass_failed_goes_straight_to_its_halves_until_it_shrinks(
    scheduler: Scheduler, engine: Engine, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of memory at 4 rows, not at 3: the 4-row batch's pass is tried once, its later steps go
    straight to the halves (no failed pass a step), and once a row has left, the batch pass runs
    again. Every row gets the tokens it gets alone."""
    monkeypatch.setattr(scheduler_module, "BATCH_PASS_RETRY_SECONDS", 3600.0)  # not within this test
    requests = [_request(f"r{i}", (1, 5, 6 + i), 10 if i == 3 else 30) for i in range(4)]
    alone = [await _tokens(scheduler.submit(r)) for r in requests]
    passes = _batch_passes_fail(engine, monkeypatch, batch_fails=lambda rows: rows >= 4)
    failed_passes: list[tuple[str, str]] = []
    sched = Scheduler(engine, tokenizer, on_step=lambda stats: failed_passes.extend(stats.failed_passes))
    results = await _run_together(sched, requests)
    assert results == alone
    # r3's 9 decode steps with all four rows: one failed try, then halves; then 20 steps of three.
    assert passes.batch == [4] + [3] * 20
    assert passes.parts == [(0, 2), (2, 2)] * 9
    assert failed_passes == [("decode", "out_of_memory")]


async def test_a_row_whose_own_pass_fails_too_ends_alone_and_told_so(
    scheduler: Scheduler,
    engine: Engine,
    tokenizer: Tokenizer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A pass that holds one row's work fails (out of memory for it, at its 11th position): the half
    it is in fails, then its row alone, and only that request ends, told it was out of memory; the
    rest of its half and the other half go on with the tokens they get alone."""
    requests = [_request(f"r{i}", (1, 5, 6 + i), 30) for i in range(4)]
    alone = [await _tokens(scheduler.submit(r)) for r in requests]
    victim: list[RequestHandle] = []

    def holds_the_victim_late(first_slot: int, rows: int) -> bool:
        handle = victim[0]
        return not handle.failed and first_slot <= handle.slot < first_slot + rows and handle.cached >= 10

    monkeypatch.setattr(scheduler_module, "BATCH_PASS_RETRY_SECONDS", 0.0)  # tried again every step
    _batch_passes_fail(engine, monkeypatch, holds_the_victim_late)
    failed_passes: list[tuple[str, str]] = []
    sched = Scheduler(engine, tokenizer, on_step=lambda stats: failed_passes.extend(stats.failed_passes))
    victim.append(sched.submit(requests[1]))
    # r1 is queued first here, so it sits in slot 0; the others after it.
    others = await _run_together(sched, [requests[i] for i in (0, 2, 3)])
    assert others == [alone[i] for i in (0, 2, 3)]
    with pytest.raises(PassOutOfMemoryError, match=r"out of memory decoding \(request r1, 11 tokens\)"):
        await _tokens(victim[0])
    # Every step's batch pass failed, the victim's half once, then its own pass: the metrics count each.
    assert failed_passes.count(("decode_part", "out_of_memory")) == 1
    assert failed_passes.count(("decode_alone", "out_of_memory")) == 1
    assert failed_passes.count(("decode", "out_of_memory")) == len(failed_passes) - 2 >= 29
    # The victim's own pass is its request's failure: logged with it.
    assert sum("decode pass failed for request r1" in r.getMessage() for r in caplog.records) == 1


async def test_gauges_are_published_after_a_failed_step(
    engine: Engine, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cause 5: after a failed step the observer kept the last batch and queue sizes."""
    seen: list[StepStats] = []

    def observe(stats: StepStats) -> None:
        seen.append(
            StepStats(
                queue_size=stats.queue_size, batch_size=stats.batch_size, kv_positions=stats.kv_positions
            )
        )

    sched = Scheduler(engine, tokenizer, on_step=observe)
    sched.start()
    real_prefetch = scheduler_module.prefetch_token_masks
    full_steps = 0
    failed_once = False

    def step_failing_later(rows: Any) -> None:  # a bug of the step's own, outside every pass
        nonlocal full_steps, failed_once
        rows = list(rows)
        full_steps += len(rows) == 3
        if full_steps == 3 and not failed_once:  # the third step that decodes all three
            failed_once = True
            raise RuntimeError("simulated bug")
        real_prefetch(rows)

    monkeypatch.setattr(scheduler_module, "prefetch_token_masks", step_failing_later)
    try:
        handles = [sched.submit(_request(f"g{i}", (1, 5, 6 + i), 50)) for i in range(3)]
        results = await asyncio.gather(*(_tokens(h) for h in handles), return_exceptions=True)
    finally:
        await asyncio.to_thread(sched.stop, 0)
    assert failed_once and all(isinstance(r, GenerationFailedError) for r in results)
    assert any(s.batch_size == 3 for s in seen[:-1])  # the gauges did show the running batch before
    last = seen[-1]
    assert (last.batch_size, last.queue_size, last.kv_positions) == (0, 0, 0)
