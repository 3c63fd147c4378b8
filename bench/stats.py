"""The harness's arithmetic: percentiles, median and spread, rates from timestamps, ratios.

Pure functions over plain floats (no numpy), so the genai worker's virtualenv could import them too
and tests can check them by hand.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default, Excel's PERCENTILE.INC)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q}: expected 0..100")
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


@dataclass(frozen=True)
class Spread:
    """Median with the range and the interquartile range of repeated measurements."""

    median: float
    min: float
    max: float
    p25: float
    p75: float
    n: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def spread(values: Sequence[float]) -> Spread:
    return Spread(
        median=median(values),
        min=min(values),
        max=max(values),
        p25=percentile(values, 25),
        p75=percentile(values, 75),
        n=len(values),
    )


@dataclass(frozen=True)
class RunTiming:
    """One generation, from `[start, token_1, ..., token_n]` timestamps in seconds."""

    tokens: int
    ttft_s: float  # start to the first generated token: prefill plus picking one token
    decode_tok_s: float  # tokens 2..n over the time after the first: decode alone, prefill excluded
    end_to_end_tok_s: float  # n tokens over the whole call


def run_timing(timestamps: Sequence[float]) -> RunTiming:
    """Rates of one run. Decode rate is (n - 1) / (t_n - t_1): n - 1 forward passes follow the first token."""
    if len(timestamps) < 3:
        raise ValueError("need the start and at least two token timestamps")
    if any(b < a for a, b in itertools.pairwise(timestamps)):
        raise ValueError("timestamps must not go backwards")
    start, first, last = timestamps[0], timestamps[1], timestamps[-1]
    tokens = len(timestamps) - 1
    return RunTiming(
        tokens=tokens,
        ttft_s=first - start,
        decode_tok_s=_rate(tokens - 1, last - first),
        end_to_end_tok_s=_rate(tokens, last - start),
    )


def inter_token_gaps(token_times: Sequence[float]) -> list[float]:
    """Seconds between consecutive tokens of one stream (the first token's wait is TTFT, not a gap)."""
    return [b - a for a, b in itertools.pairwise(token_times)]


def aggregate_tok_s(starts: Sequence[float], ends: Sequence[float], tokens: Sequence[int]) -> float:
    """All streams' tokens over the wall time from the first request sent to the last token received."""
    if not (len(starts) == len(ends) == len(tokens)) or not starts:
        raise ValueError("need one start, end and token count per stream")
    return _rate(sum(tokens), max(ends) - min(starts))


def aggregate_decode_tok_s(token_times: Sequence[Sequence[float]]) -> float:
    """Tokens after each stream's first, over the window from the end of the prefill that came before
    any decoding to the last token.

    The window opens at the last first token that arrived before any stream's second: whether a server
    sends the first tokens of the prompts it prefilled up front together or each as its prefill ends,
    that prefill is left out. A later stream's prefill (one that waited for a KV slot, or was
    prefilled while others decoded) falls inside the window and counts against the rate.
    """
    if not token_times or not all(token_times):
        raise ValueError("need at least one token time per stream")
    seconds = [times[1] for times in token_times if len(times) > 1]
    if not seconds:
        raise ValueError("no stream has a token after its first: nothing was decoded")
    first_decoded = min(seconds)
    opened = max(times[0] for times in token_times if times[0] < first_decoded)
    return _rate(
        sum(len(times) - 1 for times in token_times), max(times[-1] for times in token_times) - opened
    )


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None where either side is missing or the denominator is not positive."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Ratio within each repetition: measured close together, so slow drifts in machine load cancel."""
    if len(numerators) != len(denominators):
        raise ValueError("paired ratios need as many numerators as denominators")
    return [n / d for n, d in zip(numerators, denominators, strict=True) if d > 0]


def _rate(count: int, seconds: float) -> float:
    if seconds <= 0:
        raise ValueError(f"{count} events in {seconds} s: the interval must be positive")
    return count / seconds


def distribution(values: list[float]) -> dict[str, Any]:
    """Median and spread, with the repetitions themselves for anyone who wants to look closer."""
    return {**spread(values).to_dict(), "samples": values}
