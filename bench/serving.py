"""Engine v2 against the engine before it, through the same gRPC workloads in the same run (issue 9):
batch-1 streams, the concurrency sweep, mixed prompt lengths all at once vs one after another, and
inter-token latency of running streams while long prompts keep arriving.

Servers are "grpc" (today's engine) and "grpc-before" (commit `variants.BEFORE_COMMIT`, left-padded
batches and a KV cache concatenated every step), both fp32 on the same checkpoint.
"""

from __future__ import annotations

from typing import Any

from .cells import times, value_cell
from .stats import distribution, inter_token_gaps, median, paired_ratios, percentile, ratio
from .variants import BEFORE_COMMIT

SERVER_NAMES = {"grpc": "engine v2", "grpc-before": f"engine before v2 ({BEFORE_COMMIT})"}
# Issue 9's targets: 16 mixed-length requests at once at least 4x one after another; the inter-token
# p99 of running streams under long-prompt arrivals at most 3x its p50.
TARGET_MIXED_VS_SEQUENTIAL = 4.0
TARGET_ARRIVALS_P99_OVER_P50 = 3.0


def throughput_tok_s(streams: list[dict[str, Any]]) -> float:
    """Generated tokens of all `streams` over the wall time from the first request sent to the last
    token received: what a client sending them sees, prefill included."""
    start = min(s["sent"] for s in streams)
    end = max(s["token_times"][-1] for s in streams if s["token_times"])
    tokens = sum(len(s["token_times"]) for s in streams)
    return tokens / (end - start) if end > start else 0.0


def mixed(runs: dict[str, list[list[dict[str, Any]]]]) -> dict[str, Any]:
    """One server's mixed-length runs: throughput all at once and one after another, and their ratio
    from the medians and within each repetition (the two ran back to back there)."""
    concurrent = [throughput_tok_s(streams) for streams in runs.get("concurrent", [])]
    sequential = [throughput_tok_s(streams) for streams in runs.get("sequential", [])]
    if not concurrent or not sequential:
        return {"unavailable": "not measured"}
    prompt_tokens = [s["prompt_tokens"] for streams in runs["concurrent"] for s in streams]
    return {
        "concurrent_tok_s": distribution(concurrent),
        "sequential_tok_s": distribution(sequential),
        "ratio": ratio(median(concurrent), median(sequential)),
        "ratio_per_repetition": paired_ratios(concurrent, sequential)
        if len(concurrent) == len(sequential)
        else None,
        "prompt_tokens": {
            "min": min(prompt_tokens),
            "max": max(prompt_tokens),
            "median": median(prompt_tokens),
        },
    }


def arrival_gaps(result: dict[str, Any]) -> list[float]:
    """Inter-token gaps of the running streams from the moment the first long prompt was sent: the
    gaps long prompts can stretch (each gap counted where its later token arrived)."""
    if not result["long"]:
        return []
    first_sent = result["long"][0]["sent"]
    gaps: list[float] = []
    for stream in result["streams"]:
        times = stream["token_times"]
        gaps += [
            gap for gap, later in zip(inter_token_gaps(times), times[1:], strict=True) if later > first_sent
        ]
    return gaps


def arrivals(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One server's arrival runs, the gaps pooled over its repetitions."""
    gaps = [gap for run in runs for gap in arrival_gaps(run)]
    if not gaps:
        return {"unavailable": "no tokens arrived after a long prompt was sent"}
    p50, p99 = percentile(gaps, 50), percentile(gaps, 99)
    long = [request["ended"] - request["sent"] for run in runs for request in run["long"]]
    return {
        "inter_token_s": {"p50": p50, "p99": p99, "max": max(gaps), "n": len(gaps)},
        "p99_over_p50": ratio(p99, p50),
        "long_requests": len(long),
        "long_request_s": median(long),
    }


def summarize(raw: Any, sweeps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The before/after sections of `raw` (a run.RawResults), keyed by server; `sweeps`: each server's
    concurrency levels, already summarized (report.sweep_level)."""
    c = raw.config
    return {
        "before_commit": BEFORE_COMMIT,
        "sweep": {server: levels for server, levels in sweeps.items() if levels},
        "mixed": {
            "requests": c.mixed_requests,
            "max_words": c.mixed_max_words,
            "new_tokens": c.mixed_new_tokens,
            "servers": {server: mixed(runs) for server, runs in raw.mixed.items()},
        },
        "arrivals": {
            "streams": c.arrival_streams,
            "new_tokens": c.arrival_new_tokens,
            "long_prompt_tokens": c.arrival_prompt_tokens,
            "servers": {server: arrivals(runs) for server, runs in raw.arrivals.items()},
        },
    }


def target_values(serving: dict[str, Any]) -> dict[str, float | None]:
    """Today's engine's values for issue 9's serving targets (None where not measured)."""
    today_mixed = serving.get("mixed", {}).get("servers", {}).get("grpc", {})
    today_arrivals = serving.get("arrivals", {}).get("servers", {}).get("grpc", {})
    return {
        "16 mixed-length requests at once vs one by one": today_mixed.get("ratio"),
        "inter-token p99 ÷ p50 under long-prompt arrivals (at most)": today_arrivals.get("p99_over_p50"),
    }


def markdown_lines(serving: dict[str, Any], batch1: dict[str, Any]) -> list[str]:
    """Today's engine beside the one before v2: one table, a column each and their ratio."""
    if "grpc-before" not in serving["sweep"] and "grpc-before" not in serving["mixed"]["servers"]:
        return []
    # label, v2, before, format, which way is better (None: no ratio column)
    rows: list[tuple[str, float | None, float | None, str, str | None]] = []
    for key, case in batch1.items():
        peers = case["peers"]
        if "decode_tok_s" in peers.get("grpc", {}) and "decode_tok_s" in peers.get("grpc-before", {}):
            rows.append(
                (
                    f"batch-1 stream decode tok/s, prompt {key.split('/')[0]}",
                    peers["grpc"]["decode_tok_s"]["median"],
                    peers["grpc-before"]["decode_tok_s"]["median"],
                    "{:.0f}",
                    "higher",
                )
            )
    sweep = {server: serving["sweep"].get(server, {}) for server in SERVER_NAMES}

    def side_by_side(summaries: dict[str, dict[str, Any]], key: str) -> tuple[Any, Any]:
        """`key` of v2's summary and of the one before it."""
        return summaries["grpc"].get(key), summaries["grpc-before"].get(key)

    def aggregate(server: str, level: str) -> float | None:
        value: float | None = sweep[server].get(level, {}).get("aggregate_decode_tok_s", {}).get("median")
        return value

    for level in sweep["grpc"]:
        rows.append(
            (
                f"aggregate decode tok/s, {level} stream(s)",
                aggregate("grpc", level),
                aggregate("grpc-before", level),
                "{:.0f}",
                "higher",
            )
        )
    rows.append(
        (
            "16 streams ÷ 1 stream, aggregate decode",
            ratio(aggregate("grpc", "16"), aggregate("grpc", "1")),
            ratio(aggregate("grpc-before", "16"), aggregate("grpc-before", "1")),
            "{:.2f}×",
            None,
        )
    )
    m = serving["mixed"]
    mixed_of = {server: m["servers"].get(server, {}) for server in SERVER_NAMES}
    for label, measure in (
        (f"{m['requests']} mixed-length requests at once, tok/s", "concurrent_tok_s"),
        ("the same one after another, tok/s", "sequential_tok_s"),
    ):
        today, before = (mixed_of[server].get(measure, {}).get("median") for server in SERVER_NAMES)
        rows.append((label, today, before, "{:.0f}", "higher"))
    rows.append(("at once ÷ one after another", *side_by_side(mixed_of, "ratio"), "{:.2f}×", None))
    a = serving["arrivals"]
    arrivals_of = {server: a["servers"].get(server, {}) for server in SERVER_NAMES}
    for name in ("p50", "p99", "max"):
        today, before = (
            arrivals_of[server]["inter_token_s"][name] * 1000
            if "inter_token_s" in arrivals_of[server]
            else None
            for server in SERVER_NAMES
        )
        rows.append((f"inter-token {name} ms under long-prompt arrivals", today, before, "{:.1f}", "lower"))
    rows.append(
        ("inter-token p99 ÷ p50 under arrivals", *side_by_side(arrivals_of, "p99_over_p50"), "{:.2f}×", None)
    )
    rows.append(
        (
            "long prompts served while the streams ran",
            *side_by_side(arrivals_of, "long_requests"),
            "{:.0f}",
            None,
        )
    )
    lines = [
        "",
        (
            f"Engine v2 against the engine before it (commit {BEFORE_COMMIT}: left-padded batches, a KV "
            "cache concatenated every step), both fp32 on the same checkpoint, each as an in-process gRPC "
            "server in this run, back to back on the same prompts (prompt 128 and 128 new tokens unless "
            f"said; mixed: {m['requests']} requests of 1 to {m['max_words']} words, {m['new_tokens']} new "
            f"tokens each; arrivals: {a['streams']} streams of {a['new_tokens']} new tokens while "
            f"{a['long_prompt_tokens']}-token prompts arrive one after another). The last column favours "
            "v2 above 1 (for latencies it is before ÷ v2):"
        ),
        "",
        f"| measure | {SERVER_NAMES['grpc']} | {SERVER_NAMES['grpc-before']} | v2 ÷ before |",
        "|---|---|---|---|",
    ]
    for label, today, before, fmt, better in rows:
        change = (
            ""
            if better is None
            else times(ratio(today, before) if better == "higher" else ratio(before, today))
        )
        lines.append(f"| {label} | {value_cell(today, fmt)} | {value_cell(before, fmt)} | {change} |")
    return lines
