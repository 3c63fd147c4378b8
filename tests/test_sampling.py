"""Sampling without a model: each step against transformers' logits processors, the chooser's
pipeline against the steps, seeding, and the sampled frequencies against the distribution."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from textgen_server.sampling import (
    ParamError,
    SamplingParams,
    TokenChooser,
    apply_frequency_presence,
    apply_repetition_penalty,
    apply_temperature,
    choose_batch,
    top_k_filter,
    top_p_filter,
)
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

F32 = npt.NDArray[np.float32]
NEG_INF = -np.inf


def _hf(processor: Any, logits: F32, input_ids: npt.NDArray[np.int64] | None = None) -> F32:
    ids = (
        torch.zeros((logits.shape[0], 1), dtype=torch.long)
        if input_ids is None
        else torch.from_numpy(input_ids)
    )
    out: F32 = processor(ids, torch.from_numpy(logits.copy())).numpy()
    return out


def _random_logits(rng: np.random.Generator) -> F32:
    """[batch, vocab] logits of varied size and scale, sometimes with ties, -inf or extreme values."""
    vocab = int(rng.choice([1, 2, 3, 7, 50, 300, 1100, 5000]))
    batch = int(rng.integers(1, 4))
    x = rng.standard_normal((batch, vocab)) * rng.choice([0.01, 1.0, 5.0, 30.0])  # [batch, vocab]
    kind = rng.integers(0, 4)
    if kind == 1:  # ties everywhere
        x = np.round(x)
    elif kind == 2 and vocab > 1:  # masked-out tokens, one finite per row at least
        x[rng.random(x.shape) < 0.4] = NEG_INF
        x[:, rng.integers(0, vocab)] = 0.5
    elif kind == 3:  # extreme values
        x[rng.random(x.shape) < 0.1] = 1e4
        x[rng.random(x.shape) < 0.1] = -1e4
    out: F32 = x.astype(np.float32)
    return out


def _assert_same_filter(ours: F32, theirs: F32) -> None:
    np.testing.assert_array_equal(ours == NEG_INF, theirs == NEG_INF)
    finite = ours > NEG_INF
    np.testing.assert_array_equal(ours[finite], theirs[finite])


def _softmax64(x: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float64]:
    z = np.asarray(x, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    out: npt.NDArray[np.float64] = e / e.sum(axis=-1, keepdims=True)
    return out


# --- each step against transformers -------------------------------------------------------------


def test_temperature_matches_transformers() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        x = _random_logits(rng)
        t = float(rng.choice([1e-3, 0.1, 0.6, 1.0, 1.7, 5.0, rng.uniform(0.01, 5)]))
        ours, theirs = apply_temperature(x, t), _hf(TemperatureLogitsWarper(t), x)
        np.testing.assert_array_equal(ours == NEG_INF, theirs == NEG_INF)
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)


def test_top_k_matches_transformers_including_ties() -> None:
    rng = np.random.default_rng(2)
    for _ in range(300):
        x = _random_logits(rng)
        k = int(rng.integers(1, 60))
        _assert_same_filter(top_k_filter(x, k), _hf(TopKLogitsWarper(k), x))
    # Ties with the k-th largest are all kept, as transformers does.
    x = np.array([[3.0, 1.0, 3.0, 2.0, 3.0]], dtype=np.float32)
    np.testing.assert_array_equal(top_k_filter(x, 2), [[3.0, NEG_INF, 3.0, NEG_INF, 3.0]])


def _assert_top_p_like_transformers(x: F32, top_p: float) -> str:
    """Same kept set as transformers, except where transformers' unstable sort picks other tokens among
    ties at the cut (same count, same values) or float32 rounding flips a token sitting on the cut."""
    ours, theirs = top_p_filter(x, top_p), _hf(TopPLogitsWarper(top_p), x)
    kept_o, kept_t = ours > NEG_INF, theirs > NEG_INF
    np.testing.assert_array_equal(ours[kept_o], x[kept_o])  # kept logits are untouched
    if np.array_equal(kept_o, kept_t):
        return "same"
    outcome = "tie"
    for row, ko, kt in zip(x, kept_o, kept_t):
        if np.array_equal(ko, kt):
            continue
        if sorted(row[ko].tolist()) == sorted(row[kt].tolist()):
            continue
        outcome = "rounding"
        p = _softmax64(row)
        for t in np.flatnonzero(ko != kt):
            above = p[row > row[t]].sum()  # mass strictly above, ties aside
            ties = p[row == row[t]].sum() - p[t]
            assert above - 1e-5 <= top_p <= above + ties + 1e-5, (t, above, ties, top_p)
    return outcome


def test_top_p_matches_transformers() -> None:
    rng = np.random.default_rng(3)
    outcomes = []
    for _ in range(300):
        x = _random_logits(rng)
        top_p = float(rng.choice([0.0, 0.05, 0.3, 0.5, 0.9, 0.95, 0.999, rng.uniform(0, 1)]))
        outcomes.append(_assert_top_p_like_transformers(x, top_p))
    # Most cases agree token for token (a quarter are built from ties); rounding flips stay rare.
    assert outcomes.count("same") > 0.7 * len(outcomes)
    assert outcomes.count("rounding") <= 3


def test_top_p_peaked_and_flat_rows_over_a_full_vocab() -> None:
    # Exercises both paths of the full-row top-p (the few-hundred-token shortcut and the full sort).
    rng = np.random.default_rng(4)
    for scale in (0.3, 3.0, 12.0):
        x = (rng.standard_normal((2, 32000)) * scale).astype(np.float32)
        for top_p in (0.1, 0.9, 0.99):
            assert _assert_top_p_like_transformers(x, top_p) in ("same", "tie")


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(st.sampled_from([-3.0, -1.0, 0.0, 0.5, 2.0, 7.0, NEG_INF]), min_size=1, max_size=40),
    top_p=st.floats(0.0, 0.9999),
)
def test_top_p_ties_property(values: list[float], top_p: float) -> None:
    x = np.array([values], dtype=np.float32)
    if not np.isfinite(x).any():
        x[0, 0] = 0.0
    _assert_top_p_like_transformers(x, top_p)  # a rounding flip is possible at an exact boundary
    ours = top_p_filter(x, top_p)[0]
    kept = np.flatnonzero(ours > NEG_INF)
    # Ties at the cut go to the lowest ids: a kept token never has a dropped equal at a lower id.
    for t in kept:
        assert not np.any((x[0, :t] == x[0, t]) & (ours[:t] == NEG_INF))


def test_top_p_zero_and_off() -> None:
    x = np.array([[1.0, 4.0, 4.0, 2.0]], dtype=np.float32)
    np.testing.assert_array_equal(top_p_filter(x, 0.0), [[NEG_INF, 4.0, NEG_INF, NEG_INF]])
    for off in (1.0, 1.5, 2.0):
        np.testing.assert_array_equal(top_p_filter(x, off), x)
    # The rule in numbers: probs 0.5, 0.25, 0.125, 0.125 — 0.5 reaches top_p=0.5, 0.75 reaches 0.6.
    y = np.log(np.array([[0.5, 0.25, 0.125, 0.125]])).astype(np.float32)
    assert (top_p_filter(y, 0.5) > NEG_INF).sum() == 1
    assert (top_p_filter(y, 0.6) > NEG_INF).sum() == 2
    assert (top_p_filter(y, 0.8) > NEG_INF).sum() == 3


def test_repetition_penalty_matches_transformers() -> None:
    rng = np.random.default_rng(5)
    for _ in range(200):
        x = _random_logits(rng)
        batch, vocab = x.shape
        ids = rng.integers(0, vocab, size=(batch, int(rng.integers(1, 40))))  # duplicates included
        penalty = float(rng.choice([1e-3, 0.5, 1.0, 1.3, 2.0, rng.uniform(0.01, 2)]))
        ours = apply_repetition_penalty(x, ids, penalty)
        theirs = _hf(RepetitionPenaltyLogitsProcessor(penalty), x, ids)
        np.testing.assert_array_equal(ours == NEG_INF, theirs == NEG_INF)
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)
        row = x[0]  # the 1-D form agrees with the batched one
        np.testing.assert_array_equal(apply_repetition_penalty(row, ids[0], penalty), ours[0])


def test_repetition_penalty_zero_and_one_are_off() -> None:
    x = np.array([2.0, -2.0, 0.0], dtype=np.float32)
    for off in (0.0, 1.0):
        np.testing.assert_array_equal(apply_repetition_penalty(x, [0, 1, 2], off), x)
    np.testing.assert_array_equal(apply_repetition_penalty(x, [0, 1, 0], 2.0), [1.0, -4.0, 0.0])
    with pytest.raises(ParamError):
        apply_repetition_penalty(x, [0], -1.0)


def test_frequency_presence_by_hand() -> None:
    # Generated 0, 0, 1 (prompt token 2 does not count): freq 0.5, presence 0.25.
    x = np.ones(4, dtype=np.float32)
    counts = np.array([2, 1, 0, 0])
    expected = [1 - 2 * 0.5 - 0.25, 1 - 1 * 0.5 - 0.25, 1.0, 1.0]
    np.testing.assert_allclose(apply_frequency_presence(x, counts, 0.5, 0.25), expected, rtol=1e-7)
    np.testing.assert_allclose(apply_frequency_presence(x[None], counts[None], 0.5, 0.25), [expected])
    np.testing.assert_array_equal(apply_frequency_presence(x, counts, 0.0, 0.0), x)

    chooser = TokenChooser.from_params(
        SamplingParams(temperature=1.0, frequency_penalty=0.5, presence_penalty=0.25, seed=1), [2], 4
    )
    for token in (0, 0, 1):
        chooser.record(token)
    np.testing.assert_allclose(chooser.probs(x), _softmax64(np.array(expected)), rtol=1e-6)


def test_steps_are_pure() -> None:
    x = np.array([[1.0, -1.0, 3.0]], dtype=np.float32)
    before = x.copy()
    apply_temperature(x, 0.5)
    top_k_filter(x, 1)
    top_p_filter(x, 0.1)
    apply_repetition_penalty(x, [[0, 1]], 1.5)
    apply_frequency_presence(x, np.ones_like(x, dtype=np.int64), 1.0, 1.0)
    np.testing.assert_array_equal(x, before)


# --- the chooser's pipeline ---------------------------------------------------------------------


def test_chooser_distribution_matches_transformers_pipeline() -> None:
    """probs() == softmax of transformers' processors in generate's order, on prompt + output ids."""
    rng = np.random.default_rng(6)
    vocab = 500
    for _ in range(40):
        params = SamplingParams(
            temperature=float(rng.choice([0.3, 0.6, 1.0, 2.5])),
            top_k=int(rng.integers(1, 51)) if rng.random() < 0.7 else None,
            top_p=float(rng.uniform(0.05, 0.99)) if rng.random() < 0.7 else None,
            repetition_penalty=float(rng.uniform(0.05, 2.0)),
            seed=int(rng.integers(1, 1000)),
        )
        prompt = rng.integers(0, vocab, 30).tolist()
        chooser = TokenChooser.from_params(params, prompt, vocab)
        history = list(prompt)
        for _ in range(5):  # advance the state through choose() itself
            history.append(chooser.choose((rng.standard_normal(vocab) * 4).astype(np.float32)))
        x = (rng.standard_normal((1, vocab)) * 4).astype(np.float32)
        processors: list[Any] = [
            RepetitionPenaltyLogitsProcessor(params.repetition_penalty),
            TemperatureLogitsWarper(params.temperature),
        ]
        if params.top_k is not None:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p is not None:
            processors.append(TopPLogitsWarper(params.top_p))
        theirs = _hf(LogitsProcessorList(processors), x, np.array([history]))
        np.testing.assert_allclose(chooser.probs(x[0]), _softmax64(theirs[0]), rtol=1e-5, atol=1e-7)


def test_chooser_distribution_matches_composed_steps() -> None:
    """probs() == the pure steps composed in the documented order, mask and OpenAI penalties included."""
    rng = np.random.default_rng(7)
    for vocab in (20, 3000):
        for _ in range(15):
            params = SamplingParams(
                temperature=float(rng.uniform(0.1, 5.0)),
                top_k=int(rng.integers(1, 51)) if rng.random() < 0.5 else None,
                top_p=float(rng.uniform(0.0, 1.2)) if rng.random() < 0.7 else None,
                repetition_penalty=float(rng.uniform(0.0, 2.0)),
                frequency_penalty=float(rng.uniform(0.0, 2.0)),
                presence_penalty=float(rng.uniform(0.0, 2.0)),
                seed=1,
            )
            prompt = rng.integers(0, vocab, 10).tolist()
            chooser = TokenChooser.from_params(params, prompt, vocab)
            generated = rng.integers(0, vocab, 8).tolist()
            for t in generated:
                chooser.record(t)
            mask = rng.random(vocab) < 0.8
            mask[0] = True
            x = (rng.standard_normal(vocab) * 3).astype(np.float32)

            y = apply_repetition_penalty(x, prompt + generated, params.repetition_penalty)
            y = apply_frequency_presence(
                y, np.bincount(generated, minlength=vocab), params.frequency_penalty, params.presence_penalty
            )
            y[~mask] = NEG_INF
            y = apply_temperature(y, params.temperature)
            if params.top_k is not None:
                y = top_k_filter(y, params.top_k)
            if params.top_p is not None:
                y = top_p_filter(y, params.top_p)
            np.testing.assert_allclose(chooser.probs(x, mask), _softmax64(y), rtol=1e-5, atol=1e-9)


def test_greedy_is_argmax_after_penalties_and_mask() -> None:
    x = np.array([1.0, 5.0, 4.0, 5.0, -1.0], dtype=np.float32)
    greedy = SamplingParams(temperature=0.0)
    assert TokenChooser.from_params(greedy, [], 5).choose(x) == 1  # ties: lowest id, as torch.argmax
    # Token 1 and 3 seen: 5 / 2 = 2.5 < 4.
    assert (
        TokenChooser.from_params(SamplingParams(temperature=0.0, repetition_penalty=2.0), [1, 3], 5).choose(x)
        == 2
    )
    mask = np.array([True, False, False, False, True])
    assert TokenChooser.from_params(greedy, [], 5).choose(x, mask) == 0
    probs = TokenChooser.from_params(greedy, [], 5).probs(x)
    np.testing.assert_array_equal(probs, [0, 1, 0, 0, 0])


def test_plain_greedy_takes_the_pipelines_token_on_hostile_logits() -> None:
    # choose() and best() have a one-pass path for greedy without penalties or mask: it must pick what
    # the whole pipeline picks (probs() always runs it), NaN, infinities, ties and all -inf included.
    rng = np.random.default_rng(21)
    vocab = 200
    ties = np.zeros(vocab, dtype=np.float32)
    ties[[7, 3, 150]] = 2.0
    cases = [*_hostile_logits(rng, vocab), ties, np.full(vocab, -np.inf, dtype=np.float32)]
    greedy = SamplingParams(temperature=0.0)
    for x in cases:
        pipeline = int(np.argmax(TokenChooser.from_params(greedy, [], vocab).probs(x)))
        assert TokenChooser.from_params(greedy, [], vocab).choose(x) == pipeline
        # best(): the same argmax with NaN as -inf and +inf as the largest float, None if all -inf.
        cleaned = np.nan_to_num(x, nan=NEG_INF, posinf=float(np.finfo(np.float32).max), neginf=NEG_INF)
        top = int(np.argmax(cleaned))
        assert TokenChooser.from_params(greedy, [], vocab).best(x) == (
            None if cleaned[top] == NEG_INF else top
        )
    assert TokenChooser.from_params(greedy, [], vocab).choose(ties) == 3


def test_top_p_zero_samples_the_most_probable_token() -> None:
    rng = np.random.default_rng(8)
    chooser = TokenChooser.from_params(SamplingParams(temperature=1.5, top_p=0.0, seed=3), [], 100)
    for _ in range(50):
        x = rng.standard_normal(100).astype(np.float32)
        assert chooser.choose(x) == int(np.argmax(x))


def test_allowed_mask() -> None:
    rng = np.random.default_rng(9)
    vocab = 64
    mask = np.zeros(vocab, dtype=bool)
    mask[[3, 17, 40]] = True
    chooser = TokenChooser.from_params(SamplingParams(temperature=5.0, seed=11), [], vocab)
    seen = {chooser.choose(rng.standard_normal(vocab).astype(np.float32), mask) for _ in range(300)}
    assert seen == {3, 17, 40}
    with pytest.raises(ValueError, match="allows no token"):
        chooser.choose(np.zeros(vocab, dtype=np.float32), np.zeros(vocab, dtype=bool))
    # The mask allows only tokens the model gives -inf: the first allowed one, never NaN.
    x = np.zeros(vocab, dtype=np.float32)
    x[mask] = NEG_INF
    assert chooser.choose(x, mask) == 3


@pytest.mark.parametrize("penalty", [1.0, 1.5], ids=["plain", "repetition-penalty"])
def test_greedy_is_the_masked_argmax_and_leaves_the_logits_alone(penalty: float) -> None:
    """Greedy with a mask (and `best` without one, which constrained greedy rows ask first): the
    argmax over the allowed tokens after the penalty, lowest id among ties, NaN as -inf, +inf as the
    largest float; the caller's logits (a row of the engine's output) are never written."""
    rng = np.random.default_rng(12)
    vocab = 50
    for trial in range(300):
        x = rng.integers(-3, 3, vocab).astype(np.float32)  # [vocab], ties on purpose
        if trial % 5 == 0:
            x[rng.integers(vocab, size=3)] = np.nan
        if trial % 7 == 0:
            x[rng.integers(vocab)] = np.inf
        if trial % 11 == 0:
            x[:] = NEG_INF
        mask = rng.random(vocab) < 0.3
        mask[rng.integers(vocab)] = True
        before = x.copy()
        expected_x = apply_repetition_penalty(
            np.nan_to_num(x, nan=NEG_INF, posinf=float(np.finfo(np.float32).max), neginf=NEG_INF),
            [1, 2, 3],
            penalty,
        )
        chooser = TokenChooser(SamplingParams(temperature=0.0, repetition_penalty=penalty), [1, 2, 3], vocab)
        best = chooser.best(x)
        assert best == (int(np.argmax(expected_x)) if expected_x.max() > NEG_INF else None)
        masked = np.where(mask, expected_x, NEG_INF)
        first_allowed = int(np.flatnonzero(mask)[0])
        assert chooser.best(x, mask) == (int(np.argmax(masked)) if masked.max() > NEG_INF else None)
        assert chooser.choose(x, mask) == (
            int(np.argmax(masked)) if masked.max() > NEG_INF else first_allowed
        )
        assert np.array_equal(x, before, equal_nan=True)


def test_choose_batch_matches_single_choosers() -> None:
    rng = np.random.default_rng(10)
    params = [SamplingParams(temperature=1.0, seed=s, top_k=20) for s in (1, 2, 3)]
    batched = [TokenChooser.from_params(p, [1, 2], 100) for p in params]
    single = [TokenChooser.from_params(p, [1, 2], 100) for p in params]
    for _ in range(20):
        logits = rng.standard_normal((3, 100)).astype(np.float32)  # [batch, vocab]
        assert choose_batch(batched, logits) == [c.choose(row) for c, row in zip(single, logits)]


# --- seeds --------------------------------------------------------------------------------------


def _run(chooser: TokenChooser, steps: list[F32]) -> list[int]:
    return [chooser.choose(x) for x in steps]


def test_same_seed_same_tokens_other_seed_other_tokens() -> None:
    rng = np.random.default_rng(11)
    vocab = 1000
    steps = [(rng.standard_normal(vocab) * 2).astype(np.float32) for _ in range(60)]
    params = SamplingParams(temperature=1.0, top_p=0.95, repetition_penalty=1.1, seed=1234)
    first = _run(TokenChooser.from_params(params, [5, 6], vocab), steps)
    assert _run(TokenChooser.from_params(params, [5, 6], vocab), steps) == first
    other = SamplingParams(temperature=1.0, top_p=0.95, repetition_penalty=1.1, seed=1235)
    assert _run(TokenChooser.from_params(other, [5, 6], vocab), steps) != first


def test_seed_independent_of_interleaved_choosers_and_global_rng() -> None:
    rng = np.random.default_rng(12)
    vocab = 300
    steps = [rng.standard_normal(vocab).astype(np.float32) for _ in range(40)]
    params = SamplingParams(temperature=1.0, seed=99)
    alone = _run(TokenChooser.from_params(params, [], vocab), steps)

    target = TokenChooser.from_params(params, [], vocab)
    others = [TokenChooser.from_params(SamplingParams(temperature=1.0, seed=s), [1], vocab) for s in (99, 7)]
    interleaved = []
    for i, x in enumerate(steps):
        np.random.seed(i)  # a global RNG being reseeded around it changes nothing
        for o in others[: i % 3]:
            o.choose(rng.standard_normal(vocab).astype(np.float32))
        interleaved.append(target.choose(x))
    assert interleaved == alone


def test_no_seed_draws_one_and_reports_it() -> None:
    vocab = 1000
    rng = np.random.default_rng(13)
    steps = [rng.standard_normal(vocab).astype(np.float32) for _ in range(40)]
    a = TokenChooser.from_params(SamplingParams(temperature=1.0), [], vocab)
    b = TokenChooser.from_params(SamplingParams(temperature=1.0), [], vocab)
    assert a.seed != b.seed
    assert 1 <= a.seed <= 9_999_999_999
    tokens = _run(a, steps)
    replay = TokenChooser.from_params(SamplingParams(temperature=1.0, seed=a.seed), [], vocab)
    assert _run(replay, steps) == tokens


# --- sampled frequencies ------------------------------------------------------------------------


def _chi2_critical(dof: int, z: float = 3.29) -> float:
    """Upper quantile of chi-square (z = 3.29: 0.9995) by Wilson–Hilferty; scipy is not a dependency."""
    h = 2.0 / (9.0 * dof)
    return dof * (1.0 - h + z * math.sqrt(h)) ** 3


def _assert_frequencies(tokens: list[int], probs: npt.NDArray[np.float64], support: list[int]) -> None:
    n = len(tokens)
    counts = np.bincount(tokens, minlength=probs.shape[0])
    assert counts.sum() == counts[support].sum(), "a token outside the support was drawn"
    expected = n * probs[support]
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    assert chi2 < _chi2_critical(len(support) - 1), (chi2, counts[support], expected)
    # And no single bin far off (5 standard deviations).
    p = probs[support]
    assert np.all(np.abs(counts[support] / n - p) < 5 * np.sqrt(p * (1 - p) / n))


def test_sampling_at_t1_matches_the_distribution() -> None:
    probs = np.array([0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02])
    logits = np.log(probs).astype(np.float32)
    chooser = TokenChooser.from_params(SamplingParams(temperature=1.0, seed=2024), [], probs.shape[0])
    _assert_frequencies([chooser.choose(logits) for _ in range(20000)], probs, list(range(8)))


def test_sampling_over_a_large_vocab_matches_the_distribution() -> None:
    # vocab > 1024 takes the block-wise inverse CDF: mass spread over several blocks.
    vocab = 32000
    probs = np.full(vocab, 0.2 / (vocab - 4))
    heavy = [7, 9000, 20000, 31999]
    probs[heavy] = [0.35, 0.2, 0.15, 0.1]
    logits = np.log(probs).astype(np.float32)
    chooser = TokenChooser.from_params(SamplingParams(temperature=1.0, seed=5), [], vocab)
    tokens = [chooser.choose(logits) for _ in range(6000)]
    light = 1  # every light token counted in one bin
    folded = [t if t in heavy else light for t in tokens]
    bins = np.zeros(vocab)
    bins[heavy] = probs[heavy]
    bins[light] = 0.2
    _assert_frequencies(folded, bins, [light, *heavy])


def test_sampling_with_top_k_and_top_p_matches_the_renormalized_distribution() -> None:
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = np.log(probs).astype(np.float32)
    for params, support in (
        (SamplingParams(temperature=1.0, top_k=3, seed=31), [0, 1, 2]),
        (SamplingParams(temperature=1.0, top_p=0.75, seed=32), [0, 1, 2]),  # 0.65 < 0.75 <= 0.8
    ):
        chooser = TokenChooser.from_params(params, [], probs.shape[0])
        renorm = np.zeros_like(probs)
        renorm[support] = probs[support] / probs[support].sum()
        _assert_frequencies([chooser.choose(logits) for _ in range(6000)], renorm, support)


# --- never NaN ----------------------------------------------------------------------------------


def _hostile_logits(rng: np.random.Generator, vocab: int) -> list[F32]:
    big = np.finfo(np.float32).max
    cases = [
        (rng.standard_normal(vocab) * 10).astype(np.float32),
        np.where(rng.random(vocab) < 0.5, big, -big).astype(np.float32),
        np.full(vocab, 1e30, dtype=np.float32),
        np.full(vocab, NEG_INF, dtype=np.float32),
        np.full(vocab, np.nan, dtype=np.float32),
    ]
    mixed = (rng.standard_normal(vocab) * 1e4).astype(np.float32)
    mixed[::3] = NEG_INF
    mixed[1::5] = np.inf
    mixed[2::7] = np.nan
    cases.append(mixed)
    return cases


@pytest.mark.parametrize("penalty", [0.0, 5e-324, 1e-46, 1e-38, 1e-6, 1.0, 2.0])
def test_card_bounds_never_yield_nan_or_inf(penalty: float) -> None:
    rng = np.random.default_rng(14)
    vocab = 200
    for temperature in (0.0, 5e-324, 1e-40, 1e-30, 0.6, 5.0):
        for top_k, top_p in ((None, None), (1, 0.0), (50, 2.0), (50, 0.5), (None, 1e-9)):
            for extra in (0.0, 2.0):
                params = SamplingParams(
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    repetition_penalty=penalty,
                    frequency_penalty=extra,
                    presence_penalty=extra,
                    seed=1,
                )
                chooser = TokenChooser.from_params(params, list(range(0, vocab, 2)), vocab)
                for x in _hostile_logits(rng, vocab):
                    probs = chooser.probs(x)
                    assert np.all(np.isfinite(probs)) and np.all(probs >= 0)
                    assert probs.sum() == pytest.approx(1.0)
                    token = chooser.choose(x)
                    assert 0 <= token < vocab and probs[token] > 0


def test_repetition_penalty_zero_means_off_in_the_chooser() -> None:
    rng = np.random.default_rng(15)
    x = rng.standard_normal(50).astype(np.float32)
    off = TokenChooser.from_params(SamplingParams(temperature=1.0, repetition_penalty=0.0), [1, 2, 3], 50)
    one = TokenChooser.from_params(SamplingParams(temperature=1.0, repetition_penalty=1.0), [1, 2, 3], 50)
    np.testing.assert_array_equal(off.probs(x), one.probs(x))


# --- parameters ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", 5.01),
        ("temperature", math.nan),
        ("top_k", 0),
        ("top_k", 51),
        ("top_k", True),
        ("top_p", -0.1),
        ("top_p", 2.5),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", 2.1),
        ("frequency_penalty", -0.5),
        ("presence_penalty", math.inf),
        ("seed", 0),
        ("seed", 10_000_000_000),
    ],
)
def test_params_out_of_range_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(ParamError) as info:
        SamplingParams(**{field: value})
    assert info.value.field == field


def test_params_defaults_and_bounds() -> None:
    default = SamplingParams()
    assert default.temperature == 0.6 and not default.greedy
    assert default.effective_top_p is None and default.effective_repetition_penalty is None
    SamplingParams(temperature=0, top_k=1, top_p=0, repetition_penalty=0, seed=1)
    SamplingParams(
        temperature=5, top_k=50, top_p=2, repetition_penalty=2, frequency_penalty=2, presence_penalty=2
    )
    assert SamplingParams(top_p=2.0).effective_top_p is None
    assert SamplingParams(top_p=0.0).effective_top_p == 0.0


@pytest.mark.parametrize("temperature", [5e-324, 1e-45, 1e-40, 1e-30])
def test_tiny_temperature_behaves_like_its_limit_greedy(temperature: float) -> None:
    # Issue 14, cause 2: 5e-324 rounds to 0 in float32; dividing by it made NaN and top-k kept nothing.
    rng = np.random.default_rng(16)
    vocab = 300
    for _ in range(20):
        x = (rng.standard_normal(vocab) * 5).astype(np.float32)
        params = SamplingParams(temperature=temperature, top_k=1, repetition_penalty=1.3, seed=1)
        greedy = SamplingParams(temperature=0.0, repetition_penalty=1.3)
        prompt = rng.choice(vocab, size=10, replace=False).tolist()
        tiny_pick = TokenChooser.from_params(params, prompt, vocab).choose(x)
        assert tiny_pick == TokenChooser.from_params(greedy, prompt, vocab).choose(x)


def test_tiny_repetition_penalty_favours_seen_positive_logits_like_its_limit() -> None:
    vocab = 50
    x = np.linspace(-2.0, 2.0, vocab).astype(np.float32)  # the argmax is the last token
    seen = [10, 30]  # x[10] < 0, x[30] > 0: the penalty's limit makes token 30 infinitely likely
    for penalty in (5e-324, 1e-46, 1e-30):
        params = SamplingParams(temperature=0.0, repetition_penalty=penalty)
        assert TokenChooser.from_params(params, seen, vocab).choose(x) == 30
