"""The benchmark harness's arithmetic, against hand-computed values (never timings)."""

from __future__ import annotations

import json
import random
import struct
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

# `bench` is a folder at the repo root, not an installed package; pytest run as a script has no cwd on sys.path.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.machine import cpu_model
from bench.prompts import FIRST_TEXT_ID, prompt_ids, text_of_length
from bench.report import _fmt_target, _speedups, _targets, constrained, sweep_level
from bench.roofline import Tensor, parse_safetensors_header, roofline_share, roofline_tok_s, weight_traffic
from bench.run import rotated
from bench.stats import (
    aggregate_decode_tok_s,
    aggregate_tok_s,
    inter_token_gaps,
    median,
    paired_ratios,
    percentile,
    ratio,
    run_timing,
    spread,
)

# -- percentiles, median, spread ---------------------------------------------------------------------


def test_percentile_interpolates_between_closest_ranks() -> None:
    values = [15.0, 20.0, 35.0, 40.0, 50.0]  # ranks 0..4
    assert percentile(values, 0) == 15.0
    assert percentile(values, 100) == 50.0
    assert percentile(values, 50) == 35.0
    assert percentile(values, 40) == pytest.approx(29.0)  # rank 1.6: 20 + 0.6 * 15
    assert percentile(values, 99) == pytest.approx(49.6)  # rank 3.96: 40 + 0.96 * 10


def test_percentile_ignores_input_order_and_handles_one_value() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([7.0], 99) == 7.0


def test_percentile_rejects_nothing_and_out_of_range() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_median_of_even_count_is_the_midpoint() -> None:
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5


def test_spread_reports_median_range_and_quartiles() -> None:
    s = spread([1.0, 2.0, 3.0, 4.0, 100.0])
    assert (s.median, s.min, s.max, s.p25, s.p75, s.n) == (3.0, 1.0, 100.0, 2.0, 4.0, 5)


# -- rates from timestamps ---------------------------------------------------------------------------


def test_run_timing_splits_prefill_from_decode() -> None:
    # start at 10 s, first token 0.5 s later, then 4 more tokens 0.1 s apart.
    t = run_timing([10.0, 10.5, 10.6, 10.7, 10.8, 10.9])
    assert t.tokens == 5
    assert t.ttft_s == pytest.approx(0.5)
    assert t.decode_tok_s == pytest.approx(4 / 0.4)  # (n - 1) / (t_n - t_1) = 10 tok/s
    assert t.end_to_end_tok_s == pytest.approx(5 / 0.9)


def test_run_timing_matches_the_total_minus_ttft_formula() -> None:
    # transformers' decode rate as (new_tokens - 1) / (total - ttft): 128 tokens, 3.0 s total, 0.46 s TTFT.
    times = [0.0, 0.46, *[0.46 + 2.54 * k / 127 for k in range(1, 128)]]
    assert run_timing(times).decode_tok_s == pytest.approx(127 / (3.0 - 0.46))


def test_run_timing_rejects_too_few_or_backward_timestamps() -> None:
    with pytest.raises(ValueError):
        run_timing([0.0, 1.0])
    with pytest.raises(ValueError):
        run_timing([0.0, 1.0, 0.5])
    with pytest.raises(ValueError):
        run_timing([0.0, 1.0, 1.0])  # two tokens at the same instant: no decode interval


def test_inter_token_gaps_start_after_the_first_token() -> None:
    assert inter_token_gaps([1.0, 1.25, 1.75]) == [0.25, 0.5]
    assert inter_token_gaps([1.0]) == []


def test_aggregate_counts_every_stream_over_the_whole_window() -> None:
    # two streams: 10 tokens from 0 to 2 s, 30 tokens from 1 to 4 s: 40 tokens in 4 s.
    assert aggregate_tok_s([0.0, 1.0], [2.0, 4.0], [10, 30]) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        aggregate_tok_s([0.0], [1.0, 2.0], [1])


def test_aggregate_decode_leaves_each_streams_first_token_out() -> None:
    # first tokens at 1 s and 1.5 s, last at 3 s and 5 s; 11 and 21 tokens: 10 + 20 decoded in 4 s.
    assert aggregate_decode_tok_s([1.0, 1.5], [3.0, 5.0], [11, 21]) == pytest.approx(7.5)
    with pytest.raises(ValueError):
        aggregate_decode_tok_s([], [], [])


def test_paired_ratios_divide_within_each_repetition() -> None:
    assert paired_ratios([200.0, 150.0, 90.0], [50.0, 30.0, 0.0]) == [
        4.0,
        5.0,
    ]  # a zero denominator is skipped
    with pytest.raises(ValueError):
        paired_ratios([1.0], [])


def test_ratio_is_none_where_a_side_is_missing() -> None:
    assert ratio(130.0, 52.0) == pytest.approx(2.5)
    assert ratio(None, 52.0) is None
    assert ratio(130.0, None) is None
    assert ratio(130.0, 0.0) is None


# -- roofline ------------------------------------------------------------------------------------------


def _header(entries: dict[str, dict[str, object]]) -> bytes:
    body = json.dumps(entries).encode()
    return struct.pack("<Q", len(body)) + body


def test_safetensors_header_lists_sizes_and_skips_metadata() -> None:
    data = _header(
        {
            "__metadata__": {"format": "pt"},
            "model.embed_tokens.weight": {"dtype": "F32", "shape": [10, 4], "data_offsets": [0, 160]},
            "model.norm.weight": {"dtype": "F16", "shape": [4], "data_offsets": [160, 168]},
        }
    )
    tensors = parse_safetensors_header(data)
    assert tensors == [
        Tensor("model.embed_tokens.weight", (10, 4), 160),
        Tensor("model.norm.weight", (4,), 8),
    ]


def test_safetensors_header_rejects_a_size_that_does_not_match_the_shape() -> None:
    with pytest.raises(ValueError):
        parse_safetensors_header(_header({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}))


def test_weight_traffic_reads_one_embedding_row_and_all_of_lm_head() -> None:
    # vocab 10, hidden 4, fp32: embedding 160 B (one row 16 B), a layer 4x4 = 64 B, lm_head 160 B.
    tensors = [
        Tensor("model.embed_tokens.weight", (10, 4), 160),
        Tensor("model.layers.0.mlp.w", (4, 4), 64),
        Tensor("lm_head.weight", (10, 4), 160),
    ]
    traffic = weight_traffic(tensors)
    assert traffic.bytes_per_token == 16 + 64 + 160
    assert traffic.parameter_bytes == 384
    assert traffic.parameters == 40 + 16 + 40
    assert traffic.excluded == ("model.embed_tokens.weight",)


def test_bench_model_reads_162_mb_per_token() -> None:
    # The bench shape (ARCHITECTURE.md): hidden 512, 8 layers, 8 heads of 64, 2 KV heads, intermediate 1536,
    # vocab 32000, fp32. Per layer: q, o 512x512; k, v 512x128; gate, up, down 512x1536; two norms of 512.
    layer = (2 * 512 * 512 + 2 * 512 * 128 + 3 * 512 * 1536 + 2 * 512) * 4
    tensors = [
        Tensor("model.embed_tokens.weight", (32000, 512), 32000 * 512 * 4),
        *[Tensor(f"model.layers.{i}.all", (layer // 4,), layer) for i in range(8)],
        Tensor("model.norm.weight", (512,), 512 * 4),
        Tensor("lm_head.weight", (32000, 512), 32000 * 512 * 4),
    ]
    traffic = weight_traffic(tensors)
    assert traffic.bytes_per_token == 512 * 4 + 8 * 12_062_720 + 2048 + 65_536_000 == 162_041_856
    assert traffic.parameters == 56_893_952  # the "57 M parameters" of ARCHITECTURE.md


def test_roofline_share_and_ceiling() -> None:
    # 162 MB per token at 100 tok/s is 16.2 GB/s: 75% of 21.6 GB/s, whose ceiling is 133.3 tok/s.
    assert roofline_share(162_000_000, 100.0, 21.6e9) == pytest.approx(0.75)
    assert roofline_tok_s(162_000_000, 21.6e9) == pytest.approx(133.333, rel=1e-4)
    with pytest.raises(ValueError):
        roofline_share(1, 1.0, 0.0)


# -- sweep summary, rotation, prompts, report formatting -------------------------------------------


def test_sweep_level_pools_streams_and_counts_short_ones() -> None:
    rep = [
        {"sent": 0.0, "token_times": [1.0, 1.5, 2.0], "completion_tokens": 3},
        {"sent": 0.0, "token_times": [2.0, 3.0], "completion_tokens": 2},  # ended early (EOS)
    ]
    level = sweep_level([rep], new_tokens=3)
    assert level["aggregate_tok_s"]["median"] == pytest.approx(5 / 3.0)
    assert level["aggregate_decode_tok_s"]["median"] == pytest.approx(
        3 / 2.0
    )  # (2 + 1) tokens from 1 s to 3 s
    assert level["ttft_s"]["p50"] == pytest.approx(1.5)  # TTFTs 1.0 and 2.0
    assert level["ttft_s"]["p99"] == pytest.approx(1.99)
    assert level["inter_token_s"]["p50"] == pytest.approx(0.5)  # gaps 0.5, 0.5, 1.0
    assert level["inter_token_s"]["n"] == 3
    assert level["streams_ended_early"] == 1


def test_speedups_from_medians_pairs_and_best_repetitions() -> None:
    engine = {
        "decode_tok_s": {"median": 75.0, "max": 100.0, "samples": [100.0, 50.0]},
        "ttft_s": {"median": 0.1},
        "end_to_end_tok_s": {"median": 60.0},
    }
    genai = {
        "decode_tok_s": {"median": 65.0, "max": 80.0, "samples": [80.0, 50.0]},
        "ttft_s": {"median": 0.15},
        "end_to_end_tok_s": {"median": 30.0},
    }
    s = _speedups({"engine": engine, "genai": genai, "transformers": {"unavailable": "not installed"}})
    assert s["genai"]["decode"] == pytest.approx(75 / 65)  # ratio of medians
    assert s["genai"]["decode_paired"] == pytest.approx(1.125)  # median of 100/80 = 1.25 and 50/50 = 1.0
    assert s["genai"]["decode_best"] == pytest.approx(1.25)  # 100 / 80
    assert s["genai"]["ttft"] == pytest.approx(
        1.5
    )  # peer TTFT / engine TTFT: above 1, this engine answers first
    assert s["genai"]["end_to_end"] == pytest.approx(2.0)
    assert s["transformers"] == {
        "decode": None,
        "decode_paired": None,
        "decode_best": None,
        "ttft": None,
        "end_to_end": None,
    }


def test_constrained_decoding_ratios_are_schema_over_none() -> None:
    def streams(seconds_per_token: float) -> list[dict[str, object]]:
        times = [1.0 + i * seconds_per_token for i in range(5)]  # 4 decode tokens after the first
        return [{"sent": 0.0, "token_times": times, "completion_tokens": 5}]

    levels = {
        1: {
            "none": [streams(0.1), streams(0.1)],
            "free": [streams(0.125), streams(0.1)],
            "bounded": [streams(0.2), streams(0.2)],
        },
        16: {"none": [streams(0.1)]},  # no schema ran at this level: nothing to compare
    }
    out = constrained(levels, new_tokens=5)  # type: ignore[arg-type]
    one = out["levels"]["1"]
    assert one["none"]["aggregate_decode_tok_s"]["median"] == pytest.approx(10.0)  # 4 tokens in 0.4 s
    free = one["schemas"]["free"]
    assert free["aggregate_decode_tok_s"]["samples"] == pytest.approx([8.0, 10.0])
    assert free["ratio"] == pytest.approx(9.0 / 10.0)  # median 9 tok/s ÷ 10
    assert free["ratio_per_repetition"] == pytest.approx([0.8, 1.0])
    assert one["schemas"]["bounded"]["ratio"] == pytest.approx(0.5)
    assert one["worst"] == pytest.approx(0.5)  # the target is held to the costlier schema
    assert set(out["levels"]) == {"1"}
    assert constrained({}, new_tokens=5) == {"unavailable": "not measured"}
    summary = {"batch1": {}, "grpc": {}, "concurrency": {}, "constrained": out}
    targets = _targets(summary)
    one_stream = targets["json schema vs none, 1 stream"]
    assert one_stream["value"] == pytest.approx(0.5) and one_stream["met"] is False
    assert targets["json schema vs none, 16 streams"]["value"] is None


def test_rotation_puts_each_peer_first_in_turn() -> None:
    peers = ["engine", "transformers", "genai"]
    assert [rotated(peers, r)[0] for r in range(4)] == ["engine", "transformers", "genai", "engine"]
    assert rotated(peers, 1) == ["transformers", "genai", "engine"]
    assert rotated([], 3) == []


def test_prompt_ids_start_with_bos_and_avoid_control_and_byte_tokens() -> None:
    ids = prompt_ids(128, random.Random(0))
    assert len(ids) == 128 and ids[0] == 1
    assert all(FIRST_TEXT_ID <= i < 32000 for i in ids[1:])


def test_text_of_length_converges_when_encoding_merges_pieces() -> None:
    # A toy vocabulary: id % 3 gives "a", "b" or "ab"; encoding merges every "ab", so text decoded
    # from random ids encodes back shorter, and the search must grow it again.
    pieces = ("a", "b", "ab")

    def decode(ids: Sequence[int]) -> str:
        return "".join(pieces[i % 3] for i in ids)

    def encode(text: str) -> list[int]:
        out, i = [], 0
        while i < len(text):
            if text.startswith("ab", i):
                out.append(302)
                i += 2
            else:
                out.append(300 if text[i] == "a" else 301)
                i += 1
        return out

    assert len(encode(decode([300, 301, 301]))) == 2  # "abb": "ab" + "b"
    text = text_of_length(50, encode, decode, random.Random(1))
    assert len(encode(text)) == 50


def test_target_formatting_uses_percent_below_one() -> None:
    assert _fmt_target({"target": 0.85, "value": 0.69, "met": False}) == "69% vs 85% not met"
    assert _fmt_target({"target": 4.0, "value": 5.125, "met": True}) == "5.12× vs 4.0× met"
    assert _fmt_target({"target": 2.5, "value": None, "met": None}) == "n/a (target 2.5)"


def test_cpu_model_reads_the_first_model_name() -> None:
    cpuinfo = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\n\nmodel name\t: other\n"
    )
    assert cpu_model(cpuinfo) == "AMD EPYC 9B14"
    assert cpu_model("processor\t: 0\n") == "unknown"
