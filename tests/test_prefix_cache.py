"""Prefix caching: a prompt that starts like a finished sequence prefills only the rest, and answers
exactly as a scheduler without the cache does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from textgen_server.engine import Engine
from textgen_server.generation import GenerationRequest
from textgen_server.prefix_cache import PrefixCache
from textgen_server.sampling import SamplingParams
from textgen_server.scheduler import Scheduler, SchedulerLimits, StepStats
from textgen_server.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0.0)


def _prompt(length: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [1, *rng.integers(3, 32000, length - 1).tolist()]


# -- the bookkeeping alone ---------------------------------------------------------------------------


def test_match_takes_the_longest_shared_prefix_and_leaves_the_last_prompt_token() -> None:
    cache = PrefixCache(min_reused=4)
    cache.hold(3, list(range(100, 120)), None)
    cache.hold(5, [*range(100, 110), 7, 7, 7], None)
    assert cache.match([*range(100, 112), 9], None, {3, 5}, prefer=5) == (3, 12)
    assert cache.match([*range(100, 110), 7, 7, 7, 8], None, {3, 5}, prefer=3) == (5, 13)
    # The whole prompt is held: its last token still needs a pass for the first new token's logits.
    assert cache.match(list(range(100, 120)), None, {3, 5}, prefer=3) == (3, 19)
    # Only the slots offered count.
    assert cache.match([*range(100, 110), 7, 7, 7, 8], None, {3}, prefer=3) == (3, 10)


def test_match_needs_the_same_adapter_and_a_long_enough_prefix() -> None:
    adapter, other = object(), object()
    cache = PrefixCache(min_reused=8)
    cache.hold(0, list(range(50)), adapter)
    cache.hold(1, list(range(5)), None)  # too short to keep
    assert not cache.holds(1)
    assert cache.match(list(range(60)), None, {0, 1}, prefer=0) is None
    assert cache.match(list(range(60)), other, {0, 1}, prefer=0) is None
    assert cache.match(list(range(60)), adapter, {0, 1}, prefer=1) == (0, 50)
    assert cache.match([*range(7), 99, *range(8, 60)], adapter, {0}, prefer=0) is None  # 7 < 8


def test_equal_prefixes_prefer_the_slot_that_needs_no_copy() -> None:
    cache = PrefixCache(min_reused=4)
    for slot in (2, 6, 9):
        cache.hold(slot, list(range(30)), None)
    assert cache.match(list(range(40)), None, {2, 6, 9}, prefer=6) == (6, 30)


def test_spare_takes_an_empty_slot_then_the_least_recently_used() -> None:
    cache = PrefixCache(min_reused=4)
    cache.hold(1, list(range(10)), None)
    cache.hold(2, list(range(20, 30)), None)
    assert cache.spare({1, 2, 4}) == 4
    assert cache.spare({1, 2}) == 1
    cache.match(list(range(12)), None, {1, 2}, prefer=0)  # slot 1 reused: now slot 2 is older
    assert cache.spare({1, 2}) == 2
    cache.forget(2)
    assert cache.spare({1, 2}) == 2
    assert cache.spare(set()) is None


def test_refuge_keeps_the_more_recent_of_two_held_prefixes() -> None:
    cache = PrefixCache(min_reused=4)
    cache.hold(0, list(range(10)), None)
    cache.hold(1, list(range(20, 30)), None)
    assert cache.refuge(1, {0, 3}) == 3  # an empty slot first
    assert cache.refuge(1, {0}) == 0  # slot 0 was used less recently than slot 1
    assert cache.refuge(0, {1}) is None  # slot 1 is the more recent: slot 0's prefix goes
    assert cache.refuge(5, {0, 3}) is None  # nothing held, nothing to keep
    cache.moved(1, 3)
    assert not cache.holds(1)
    assert cache.positions(3) == 10
    assert cache.match(list(range(20, 40)), None, {3}, prefer=0) == (3, 10)


# -- through the scheduler -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return Engine(tiny_model_dir, provider="cpu", slots=8, max_len=512)


@dataclass
class _Counted:
    prefilled: int = 0
    reused: int = 0

    def __call__(self, stats: StepStats) -> None:
        self.prefilled += stats.prefill_positions
        self.reused += stats.reused_positions


async def _scheduler(
    engine: Engine, tokenizer: Tokenizer, *, prefix_cache: bool
) -> tuple[Scheduler, _Counted]:
    counted = _Counted()
    limits = SchedulerLimits(
        max_batch_size=engine.slots, max_batch_total_tokens=engine.slots * engine.max_len
    )
    scheduler = Scheduler(engine, tokenizer, limits, on_step=counted, prefix_cache=prefix_cache)
    scheduler.start()
    return scheduler, counted


@pytest.fixture
async def cached(engine: Engine, tokenizer: Tokenizer) -> AsyncIterator[tuple[Scheduler, _Counted]]:
    scheduler, counted = await _scheduler(engine, tokenizer, prefix_cache=True)
    yield scheduler, counted
    await asyncio.to_thread(scheduler.stop, 0)


async def _generate(scheduler: Scheduler, prompt: list[int], new_tokens: int, rid: str = "r") -> list[int]:
    request = GenerationRequest(
        request_id=rid, prompt_ids=tuple(prompt), max_new_tokens=new_tokens, sampling=GREEDY
    )
    return [event.token_id async for event in scheduler.submit(request).events()]


async def _without_cache(
    engine: Engine, tokenizer: Tokenizer, prompts: list[list[int]], new: int
) -> list[list[int]]:
    """Greedy answers from a scheduler without the cache, one after another, on the same engine (the
    test's cached scheduler is idle meanwhile and not used again: its slots get overwritten)."""
    scheduler, _ = await _scheduler(engine, tokenizer, prefix_cache=False)
    try:
        return [await _generate(scheduler, prompt, new) for prompt in prompts]
    finally:
        await asyncio.to_thread(scheduler.stop, 0)


async def test_a_chats_next_turn_prefills_only_what_is_new(
    cached: tuple[Scheduler, _Counted], engine: Engine, tokenizer: Tokenizer
) -> None:
    scheduler, counted = cached
    first = _prompt(120, seed=1)
    answer = await _generate(scheduler, first, 24)
    assert len(answer) == 24
    # The next turn resends the conversation: the first prompt, the answer, and a new message.
    second = [*first, *answer, *_prompt(40, seed=2)[1:]]
    before = _Counted(counted.prefilled, counted.reused)
    reply = await _generate(scheduler, second, 16)
    # The slot holds the prompt and every answer token but the last, which was never fed back.
    held = len(first) + len(answer) - 1
    assert counted.reused - before.reused == held
    assert counted.prefilled - before.prefilled == len(second) - held
    (expected_answer,) = await _without_cache(engine, tokenizer, [first], 24)
    (expected_reply,) = await _without_cache(engine, tokenizer, [second], 16)
    assert (answer, reply) == (expected_answer, expected_reply)


async def test_leavers_in_gaps_are_kept_in_free_slots(
    cached: tuple[Scheduler, _Counted], engine: Engine, tokenizer: Tokenizer
) -> None:
    scheduler, counted = cached
    # Four sequences finishing at different steps: the early ones leave gaps that later ones fill.
    prompts = [_prompt(30 + 10 * i, seed=10 + i) for i in range(4)]
    lengths = [4, 12, 6, 20]
    answers = await asyncio.gather(
        *(_generate(scheduler, p, n, f"a{i}") for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)))
    )
    follow_ups = [
        [*p, *a, *_prompt(9, seed=20 + i)[1:]] for i, (p, a) in enumerate(zip(prompts, answers, strict=True))
    ]
    before = counted.reused
    replies = [await _generate(scheduler, f, 8, f"b{i}") for i, f in enumerate(follow_ups)]
    assert counted.reused - before == sum(len(p) + len(a) - 1 for p, a in zip(prompts, answers, strict=True))
    assert replies == await _without_cache(engine, tokenizer, follow_ups, 8)


async def test_an_overwritten_slot_serves_nothing(
    engine: Engine, tokenizer: Tokenizer, tiny_model_dir: Path
) -> None:
    one_slot = Engine(tiny_model_dir, provider="cpu", slots=1, max_len=256)
    scheduler, counted = await _scheduler(one_slot, tokenizer, prefix_cache=True)
    try:
        first = _prompt(60, seed=3)
        answer = await _generate(scheduler, first, 5)
        await _generate(scheduler, _prompt(50, seed=4), 5)  # takes the only slot
        before = counted.reused
        await _generate(scheduler, [*first, *answer, 7, 8, 9], 5)
        assert counted.reused == before
    finally:
        await asyncio.to_thread(scheduler.stop, 0)


async def test_without_the_cache_every_prompt_is_prefilled(engine: Engine, tokenizer: Tokenizer) -> None:
    scheduler, counted = await _scheduler(engine, tokenizer, prefix_cache=False)
    try:
        first = _prompt(80, seed=5)
        answer = await _generate(scheduler, first, 6)
        second = [*first, *answer, 11, 12]
        await _generate(scheduler, second, 3)
        assert counted.reused == 0
        assert counted.prefilled == len(first) + len(second)
    finally:
        await asyncio.to_thread(scheduler.stop, 0)
