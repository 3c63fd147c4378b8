"""The benchmark harness's arithmetic, against hand-computed values (never timings)."""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.llamacpp_env import build_percent, cmake_options, cpu_flags, vendored_commit
from bench.lora import markdown_lines as lora_markdown
from bench.lora import summarize as summarize_lora
from bench.machine import Cache, cpu_model, last_level_cache, parse_cache_size, read_caches
from bench.peers.llamacpp_peer import (
    LlamaBenchError,
    LlamacppPeer,
    decode_rate,
    parallel_decode_rate,
    parse_llama_bench_jsonl,
)
from bench.prompts import FIRST_TEXT_ID, digits_of_length, prompt_ids, text_of_length, words_prompt
from bench.quantized import markdown_lines as quantized_markdown
from bench.quantized import summarize as summarize_quantized
from bench.quantized import target_values as quantized_target_values
from bench.report import (
    _fmt_target,
    _llamacpp_lines,
    _peer_rates,
    _roofline_cell,
    _roofline_label,
    _speedups,
    _targets,
    constrained,
    sweep_level,
)
from bench.roofline import (
    Tensor,
    parse_safetensors_header,
    roofline_applies,
    roofline_share,
    roofline_tok_s,
    weight_traffic,
)
from bench.run import rotated
from bench.serving import arrival_gaps, throughput_tok_s
from bench.serving import arrivals as arrivals_summary
from bench.serving import mixed as mixed_summary
from bench.stamps import exporter_digest, files_fingerprint
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

REPO = Path(__file__).resolve().parent.parent

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
    # first tokens at 1 s and 1.5 s, both before any second token (1.6 s); last at 3 s and 5 s;
    # 11 and 21 tokens: 10 + 20 decoded in the 3.5 s after the last first token.
    streams = [[1.0, *np.linspace(1.6, 3.0, 10)], [1.5, *np.linspace(1.6, 5.0, 20)]]
    assert aggregate_decode_tok_s(streams) == pytest.approx(30 / 3.5)
    with pytest.raises(ValueError):
        aggregate_decode_tok_s([])
    with pytest.raises(ValueError):
        aggregate_decode_tok_s([[1.0], [1.2]])  # no stream decoded


def test_aggregate_decode_counts_a_prefill_after_decoding_began() -> None:
    # The second stream's first token comes after the first stream's second: it waited, or was
    # prefilled while the first decoded. Its wait is inside the window, which opens at 1 s.
    streams = [[1.0, *np.linspace(1.1, 3.0, 10)], [2.0, *np.linspace(2.1, 5.0, 20)]]
    assert aggregate_decode_tok_s(streams) == pytest.approx(30 / 4.0)


def test_aggregate_decode_is_the_same_whether_first_tokens_go_out_together_or_one_by_one() -> None:
    # Four prompts prefilled before any decoding, 0.1 s each: their first tokens at 0.4 s together,
    # or at 0.1, 0.2, 0.3 and 0.4 s; decoding from 0.4 s, 10 tokens each at 0.5..1.4 s.
    decoded = list(np.linspace(0.5, 1.4, 10))
    together = [[0.4, *decoded] for _ in range(4)]
    one_by_one = [[0.1 * (i + 1), *decoded] for i in range(4)]
    assert aggregate_decode_tok_s(one_by_one) == aggregate_decode_tok_s(together) == pytest.approx(40 / 1.0)


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


def test_lora_summary_compares_mixed_with_all_base_within_each_repetition() -> None:
    def rep(seconds: float) -> list[dict[str, Any]]:
        """Two streams of 5 tokens, first tokens at 1 s, last at 1 + seconds: 8 decode tokens."""
        times = [1.0 + seconds * i / 4 for i in range(5)]
        return [{"sent": 0.0, "token_times": times, "completion_tokens": 5}] * 2

    runs = {
        "plain": [rep(1.0), rep(2.0)],
        "lora_base": [rep(1.0), rep(4.0)],
        "lora_mixed": [rep(2.0), rep(5.0)],
    }
    summary = summarize_lora(runs, new_tokens=5)
    assert summary["configurations"]["lora_mixed"]["aggregate_decode_tok_s"]["samples"] == [4.0, 1.6]
    assert summary["lora_mixed_vs_lora_base_per_repetition"] == pytest.approx([0.5, 0.8])
    assert summary["lora_mixed_vs_lora_base"] == pytest.approx(2.8 / 5.0)  # medians 2.8 and 5.0
    assert summary["lora_base_vs_plain_per_repetition"] == pytest.approx([1.0, 0.5])
    assert summary["streams"] == 2
    assert "0.56×" in "\n".join(lora_markdown(summary))


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
    summary = {
        "batch1": {},
        "grpc": {},
        "concurrency": {},
        "bandwidth": {"roofline_applies": True},
        "constrained": out,
    }
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


# -- last-level cache, and when the roofline applies ---------------------------------------------------


def test_cache_sizes_read_as_sysfs_writes_them() -> None:
    assert parse_cache_size("32768K") == 32 * 1024 * 1024
    assert parse_cache_size("1M") == 1 << 20
    assert parse_cache_size("512\n") == 512
    with pytest.raises(ValueError):
        parse_cache_size("big")


def test_last_level_cache_is_the_highest_that_holds_data() -> None:
    caches = [
        Cache(1, "Data", 48 << 10, "0"),
        Cache(1, "Instruction", 32 << 10, "0"),
        Cache(2, "Unified", 1 << 20, "0"),
        Cache(3, "Unified", 32 << 20, "0-1"),
    ]
    assert last_level_cache(caches) == caches[3]
    # An instruction cache never holds weights, however high its level.
    assert last_level_cache([caches[0], Cache(4, "Instruction", 1 << 30, "0-1")]) == caches[0]
    assert last_level_cache([]) is None


def test_read_caches_parses_a_sysfs_tree_and_skips_incomplete_entries(tmp_path: Path) -> None:
    entries = {
        "index0": ("1", "Data", "48K", "0"),
        "index2": ("2", "Unified", "1024K", "0"),
        "index3": ("3", "Unified", "307200K", "0-55"),
    }
    for index, values in entries.items():
        (tmp_path / index).mkdir()
        for name, value in zip(("level", "type", "size", "shared_cpu_list"), values, strict=True):
            (tmp_path / index / name).write_text(value + "\n", encoding="utf-8")
    (tmp_path / "index4").mkdir()  # no files at all, as some hypervisors leave it
    caches = read_caches(tmp_path)
    assert [c.level for c in caches] == [1, 2, 3]
    assert last_level_cache(caches) == Cache(3, "Unified", 300 << 20, "0-55")


def test_roofline_does_not_apply_when_the_weights_fit_in_the_cache() -> None:
    bench_model = 162_041_856  # fp32 bytes read per token
    assert not roofline_applies(bench_model, 300 << 20)  # the 300 MB L3 of issue 9's Xeon
    assert roofline_applies(bench_model, 32 << 20)  # a 32 MiB L3: five times smaller than the weights
    assert roofline_applies(bench_model, None)  # unknown: shown, with the size marked unknown
    assert not roofline_applies(1000, 1000)  # exactly full still fits
    assert not roofline_applies(3999, 1000)  # a quarter of them in the cache: not memory-bound
    assert roofline_applies(4000, 1000)


def _summary_for_roofline(llc_bytes: int | None, shares: dict[str, float] | None = None) -> dict[str, Any]:
    llc = None if llc_bytes is None else {"level": 3, "size_bytes": llc_bytes}
    peers = {name: {"roofline_share": share} for name, share in (shares or {}).items()}
    return {
        "machine": {"last_level_cache": llc},
        "weights": {"bytes_per_token": 162_041_856},
        "bandwidth": {"roofline_applies": roofline_applies(162_041_856, llc_bytes)},
        "batch1": {"128/128": {"peers": peers, "speedup": {}}},
    }


def test_roofline_row_names_the_cache_and_says_when_it_does_not_apply() -> None:
    big = _summary_for_roofline(300 << 20)
    assert _roofline_label(big) == (
        "memory roofline (decode, first case): does not apply, the 162 MB of weights read per token "
        "fit in the 300 MiB L3"
    )
    assert _roofline_cell(big, {"roofline_share": 1.06}) == "does not apply"
    small = _summary_for_roofline(32 << 20)
    assert _roofline_label(small) == (
        "memory roofline share (decode, first case; weights read per token 162 MB = 4.8× the 32 MiB L3)"
    )
    assert _roofline_cell(small, {"roofline_share": 0.74}) == "74%"
    assert "unknown" in _roofline_label(_summary_for_roofline(None))
    assert _roofline_label(_summary_for_roofline(100 << 20)) == (
        "memory roofline (decode, first case): does not apply, the 162 MB of weights read per token are "
        "only 1.5× the 100 MiB L3, which serves a good part of them (at least 4× is needed)"
    )


def test_a_peer_past_the_roofline_means_the_bandwidth_reading_is_low() -> None:
    """Shares of 109% and 128% were printed, and the 90% target called met."""
    beaten = _summary_for_roofline(32 << 20, {"engine": 1.09, "genai": 1.28})
    assert _roofline_label(beaten) == (
        "memory roofline (decode, first case; weights read per token 162 MB = 4.8× the 32 MiB L3): no bound "
        "measured, genai decoded at 128% of what the measured bandwidth allows"
    )
    assert _roofline_cell(beaten, {"roofline_share": 1.09}) == "n/a"
    assert _roofline_cell(_summary_for_roofline(32 << 20, {"engine": 0.9}), {"roofline_share": 0.9}) == "90%"


# -- llama.cpp: build options, build progress, llama-bench output ---------------------------------------

# The flags line of an AMD EPYC with AVX-512 (trimmed), and of an AVX2-only desktop part.
EPYC_FLAGS = (
    "flags\t\t: fpu sse4_2 avx f16c fma bmi2 avx2 avx512f avx512dq avx512cd avx512bw avx512vl "
    "avx512vbmi avx512_vnni avx512_bf16 avx_vnni\n"
)
AVX2_FLAGS = "flags\t\t: fpu sse4_2 avx f16c fma bmi2 avx2\n"
SAPPHIRE_RAPIDS_FLAGS = EPYC_FLAGS.rstrip("\n") + " amx_bf16 amx_tile amx_int8\n"


def _options(cpuinfo: str) -> dict[str, str]:
    return dict(o.removeprefix("-D").split("=", 1) for o in cmake_options(cpu_flags(cpuinfo)))


def test_cpu_flags_come_from_the_first_flags_line() -> None:
    assert cpu_flags("processor\t: 0\n" + AVX2_FLAGS + "flags\t\t: avx512f\n") == {
        "fpu",
        "sse4_2",
        "avx",
        "f16c",
        "fma",
        "bmi2",
        "avx2",
    }
    assert cpu_flags("processor\t: 0\n") == set()


def test_build_is_portable_with_avx512_where_the_cpu_has_it_and_never_amx() -> None:
    options = _options(SAPPHIRE_RAPIDS_FLAGS)
    assert options["GGML_NATIVE"] == "OFF"
    assert all(options[o] == "ON" for o in ("GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_AVX512"))
    assert options["GGML_AVX512_VNNI"] == options["GGML_AVX512_BF16"] == "ON"
    assert options["GGML_AMX_TILE"] == options["GGML_AMX_INT8"] == options["GGML_AMX_BF16"] == "OFF"


def test_build_leaves_out_what_the_cpu_lacks() -> None:
    options = _options(AVX2_FLAGS)
    assert options["GGML_AVX2"] == options["GGML_FMA"] == options["GGML_F16C"] == "ON"
    assert options["GGML_AVX512"] == options["GGML_AVX512_VNNI"] == options["GGML_AVX_VNNI"] == "OFF"
    # ggml's AVX512 switch also compiles for BW, DQ, CD and VL: without avx512bw it must stay off.
    assert _options(EPYC_FLAGS.replace(" avx512bw", ""))["GGML_AVX512"] == "OFF"
    assert _options("")["GGML_AVX2"] == "OFF"


def test_build_percent_reads_cmake_progress_lines() -> None:
    assert build_percent("[ 42%] Building CXX object src/CMakeFiles/llama.dir/llama.cpp.o") == 42
    assert build_percent("[100%] Built target llama-bench") == 100
    assert build_percent("  [ 42%] indented is not a progress line") is None
    assert build_percent("warning: [ 42%] inside a line") is None


def test_vendored_commit_is_read_from_the_releases_own_changelog_section() -> None:
    changelog = (
        "# Changelog\n\n## [Unreleased]\n\n## [0.3.36]\n\n- feat: update llama.cpp to ggml-org/llama.cpp@0c1e57098\n"
        "\n## [0.3.35]\n\n- fix: something\n- feat: update llama.cpp to ggml-org/llama.cpp@4df29be4f\n"
        "\n## [0.3.34]\n\n- docs only\n"
    )
    assert vendored_commit(changelog, "0.3.36") == "0c1e57098"
    assert vendored_commit(changelog, "0.3.35") == "4df29be4f"
    assert vendored_commit(changelog, "0.3.34") is None  # no update in that release: not the next one's
    assert vendored_commit(changelog, "0.3.3") is None  # a prefix of a version is not that version


def _llama_bench_line(n_gen: int, n_depth: int, samples_ts: str, n_threads: int = 2) -> str:
    """One line of `llama-bench -o jsonl`, as the 0.3.36 sdist's build prints it (some fields left out)."""
    return (
        '{"build_commit": "0c1e57098", "build_number": 0, "cpu_info": "AMD EPYC", "gpu_info": "", '
        '"backends": "CPU", "model_filename": "bench/models/llamacpp/bench-q4_0.gguf", '
        '"model_type": "llama ?B Q4_0", "model_size": 36256768, "model_n_params": 56893952, '
        f'"n_batch": 2048, "n_ubatch": 512, "n_threads": {n_threads}, "cpu_mask": "0x0", '
        '"cpu_strict": false, "poll": 50, "type_k": "f16", "type_v": "f16", "flash_attn": -1, '
        f'"n_prompt": 0, "n_gen": {n_gen}, "n_depth": {n_depth}, "test_time": "2026-11-26T10:30:42Z", '
        '"avg_ns": 86081159, "stddev_ns": 0, "avg_ts": 371.742207, "stddev_ts": 0.000000, '
        f'"samples_ns": [ 86081159 ],"samples_ts": [ {samples_ts} ]}}'
    )


def test_llama_bench_jsonl_is_parsed_and_other_lines_skipped() -> None:
    text = "\n".join(
        [
            "load_backend: loaded CPU backend",  # a stray log line on stdout must not break parsing
            _llama_bench_line(128, 128, "371.742"),
            "",
            _llama_bench_line(128, 2048, "300.5, 310.5"),
        ]
    )
    tests = parse_llama_bench_jsonl(text)
    assert len(tests) == 2
    first = tests[0]
    assert (first.n_prompt, first.n_gen, first.n_depth, first.n_threads) == (0, 128, 128, 2)
    assert first.samples_ts == (371.742,)
    assert (first.model_type, first.model_size, first.build_commit) == (
        "llama ?B Q4_0",
        36256768,
        "0c1e57098",
    )
    assert first.flash_attn == -1
    assert tests[1].samples_ts == (300.5, 310.5)


def test_decode_rate_takes_the_test_that_was_asked_for() -> None:
    tests = parse_llama_bench_jsonl(
        _llama_bench_line(128, 128, "371.742") + "\n" + _llama_bench_line(128, 2048, "290.0")
    )
    assert decode_rate(tests, depth=2048, new_tokens=128, threads=2) == 290.0
    assert decode_rate(tests, depth=128, new_tokens=128, threads=2) == pytest.approx(371.742)
    with pytest.raises(LlamaBenchError, match="n_depth 512"):
        decode_rate(tests, depth=512, new_tokens=128, threads=2)  # nothing at that depth
    with pytest.raises(LlamaBenchError, match="got 0 of 0"):
        decode_rate([], depth=128, new_tokens=128, threads=2)  # llama-bench printed nothing


def test_decode_rate_refuses_other_threads_or_repetitions() -> None:
    other_threads = parse_llama_bench_jsonl(_llama_bench_line(128, 128, "371.742", n_threads=4))
    with pytest.raises(LlamaBenchError, match="4 threads"):
        decode_rate(other_threads, depth=128, new_tokens=128, threads=2)
    two_reps = parse_llama_bench_jsonl(_llama_bench_line(128, 128, "371.742, 380.0"))
    with pytest.raises(LlamaBenchError, match="one repetition"):
        decode_rate(two_reps, depth=128, new_tokens=128, threads=2)


def test_llamacpp_rates_become_peers_with_decode_ratios_and_no_ttft() -> None:
    per_token, bw = 162_000_000, 21.6e9
    f32 = _peer_rates("llamacpp-f32", [150.0, 100.0, 120.0], per_token, bw)
    q4 = _peer_rates("llamacpp-q4_0", [400.0, 500.0, 450.0], per_token, bw)
    assert f32["decode_tok_s"]["median"] == 120.0 and "ttft_s" not in f32
    assert f32["roofline_share"] == pytest.approx(162e6 * 120 / 21.6e9)  # 90%
    assert q4["roofline_share"] is None  # a quantized file reads fewer bytes than the checkpoint's
    engine = {
        "decode_tok_s": {**spread([100.0, 90.0, 60.0]).to_dict(), "samples": [100.0, 90.0, 60.0]},
        "ttft_s": {"median": 0.1},
        "end_to_end_tok_s": {"median": 80.0},
        "roofline_share": 0.75,
    }
    s = _speedups({"engine": engine, "llamacpp-f32": f32, "llamacpp-q4_0": q4})
    assert s["llamacpp-f32"]["decode"] == pytest.approx(90 / 120)
    assert s["llamacpp-f32"]["decode_paired"] == pytest.approx(2 / 3)  # median of 100/150, 90/100, 60/120
    assert s["llamacpp-f32"]["decode_best"] == pytest.approx(100 / 150)
    assert s["llamacpp-q4_0"]["decode"] == pytest.approx(90 / 450)
    assert s["llamacpp-q4_0"]["ttft"] is None  # llama-bench gives no time to first token

    summary = {
        **_summary_for_roofline(32 << 20),
        "batch1": {
            "128/128": {"peers": {"engine": engine, "llamacpp-f32": f32, "llamacpp-q4_0": q4}, "speedup": s}
        },
        "config": {"llamacpp_omp_wait": "passive"},
    }
    summary["bandwidth"]["roofline_bytes_s"] = bw
    table = _llamacpp_lines(summary)
    assert table[1].endswith("OpenMP wait policy: `OMP_WAIT_POLICY=passive`.")
    summary["peers"] = {
        "llamacpp-f32": {
            "omp_wait_policy": "default",
            "omp_wait_probe_tok_s": {"passive": 130.4, "default": 171.2},
        }
    }
    assert _llamacpp_lines(summary)[1].endswith(
        "OpenMP wait policy: libgomp's default, the faster in a probe at the start of the run "
        "(passive 130 tok/s, default 171 tok/s)."
    )
    assert table[3] == (
        "| measure | this engine (fp32) | llama.cpp f32 | llama.cpp Q8_0 | llama.cpp Q4_0 | engine ÷ f32 "
        "| engine ÷ Q8_0 | engine ÷ Q4_0 |"
    )
    assert table[5] == (
        "| decode tok/s, prompt 128, 128 new | 90 (60–100) | 120 (100–150) | n/a | 450 (400–500) | 0.75× | n/a | 0.20× |"
    )
    # eight columns: the label, four rates, and no ratios for a share
    assert table[6].startswith("| memory roofline share") and table[6].endswith(
        " | 75% | 90% | n/a | n/a | | | |"
    )
    assert _llamacpp_lines({"batch1": {"128/128": {"peers": {"engine": engine}, "speedup": {}}}}) == []


def test_llamacpp_wait_policy_is_passive_unless_asked_for_gomps_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")  # inherited from the caller's shell
    passive = LlamacppPeer(Path("llama-bench"), {"f32": Path("f32.gguf")}, 2, REPO)
    assert passive.env["OMP_WAIT_POLICY"] == "passive" and passive.env["OMP_NUM_THREADS"] == "2"
    default = LlamacppPeer(Path("llama-bench"), {"f32": Path("f32.gguf")}, 2, REPO, omp_wait="default")
    assert "OMP_WAIT_POLICY" not in default.env
    assert default.info("f32")["omp_wait_policy"] == "default"
    bench_file = LlamacppPeer(Path("/opt/llama-bench"), {"f32": REPO / "bench/models/f32.gguf"}, 2, REPO)
    assert (bench_file.info("f32")["model"], bench_file.info("f32")["llama_bench"]) == (
        "bench/models/f32.gguf",
        "/opt/llama-bench",
    )


# -- engine v2 against the engine before it, quantized weights (issues 9 and 10) ---------------------


def _stream(sent: float, times: list[float], prompt_tokens: int = 4) -> dict[str, Any]:
    return {
        "sent": sent,
        "token_times": times,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(times),
    }


def test_throughput_counts_every_token_from_the_first_request_to_the_last_token() -> None:
    streams = [_stream(0.0, [1.0, 2.0]), _stream(0.5, [1.5, 2.5, 4.0])]
    assert throughput_tok_s(streams) == pytest.approx(5 / 4.0)


def test_mixed_lengths_compare_at_once_with_one_after_another_within_each_repetition() -> None:
    at_once = [[_stream(0.0, [1.0, 2.0]), _stream(0.0, [1.0, 2.0])], [_stream(0.0, [2.0, 4.0])] * 2]
    in_turn = [
        [_stream(0.0, [1.0, 2.0]), _stream(2.0, [3.0, 8.0])],
        [_stream(0.0, [1.0, 2.0]), _stream(2.0, [3.0, 4.0])],
    ]
    out = mixed_summary({"concurrent": at_once, "sequential": in_turn})
    # at once: 4 tokens in 2 s and in 4 s; one after another: 4 tokens in 8 s and in 4 s
    assert out["concurrent_tok_s"]["samples"] == pytest.approx([2.0, 1.0])
    assert out["sequential_tok_s"]["samples"] == pytest.approx([0.5, 1.0])
    assert out["ratio"] == pytest.approx(1.5 / 0.75)
    assert out["ratio_per_repetition"] == pytest.approx([4.0, 1.0])
    assert mixed_summary({"concurrent": at_once}) == {"unavailable": "not measured"}


def test_arrival_gaps_start_once_the_first_long_prompt_is_sent() -> None:
    run = {
        "streams": [_stream(0.0, [1.0, 1.1, 1.2, 3.2, 3.3]), _stream(0.0, [1.0, 1.2, 3.3])],
        "long": [{"sent": 1.15, "ended": 3.1}, {"sent": 3.1, "ended": 3.4}],
    }
    # gaps whose later token came after 1.15 s: 0.1 (1.2), 2.0 (3.2), 0.1 (3.3); 0.2 (1.2), 2.1 (3.3)
    assert sorted(arrival_gaps(run)) == pytest.approx([0.1, 0.1, 0.2, 2.0, 2.1])
    out = arrivals_summary([run])
    assert out["inter_token_s"]["p50"] == pytest.approx(0.2)
    assert out["inter_token_s"]["max"] == pytest.approx(2.1)
    assert out["p99_over_p50"] == pytest.approx(percentile([0.1, 0.1, 0.2, 2.0, 2.1], 99) / 0.2)
    assert out["long_requests"] == 2 and out["long_request_s"] == pytest.approx((1.95 + 0.3) / 2)
    assert arrival_gaps({**run, "long": []}) == []


def test_an_at_most_target_is_met_below_it() -> None:
    summary = {
        "batch1": {},
        "grpc": {},
        "concurrency": {},
        "bandwidth": {"roofline_applies": True},
        "constrained": {},
        "serving": {
            "mixed": {"servers": {"grpc": {"ratio": 5.0}}},
            "arrivals": {"servers": {"grpc": {"p99_over_p50": 2.5}}},
        },
    }
    targets = _targets(summary)
    itl = targets["inter-token p99 ÷ p50 under long-prompt arrivals (at most)"]
    assert itl["met"] is True and itl["at_most"] is True
    assert _fmt_target(itl) == "2.50× vs at most 3.0× met"
    summary["serving"]["arrivals"]["servers"]["grpc"]["p99_over_p50"] = 3.5
    assert _targets(summary)["inter-token p99 ÷ p50 under long-prompt arrivals (at most)"]["met"] is False
    assert _targets(summary)["16 mixed-length requests at once vs one by one"]["met"] is True


def test_quantized_ratios_set_int4_against_q4_0_genai_int4_and_fp32() -> None:
    def peer(rate: float) -> dict[str, Any]:
        return {"decode_tok_s": {"median": rate, "min": rate, "max": rate, "n": 1}}

    batch1 = {
        "128/128": {
            "peers": {
                "engine": peer(100.0),
                "engine-int4": peer(300.0),
                "engine-int4-head4": peer(375.0),
                "engine-int8": peer(200.0),
                "genai-int4": peer(250.0),
                "llamacpp-q4_0": peer(400.0),
            }
        }
    }
    levels = {
        "grpc": {"aggregate_decode_tok_s": peer(160.0)["decode_tok_s"]},
        "grpc-int4": {"aggregate_decode_tok_s": peer(400.0)["decode_tok_s"]},
    }
    out = summarize_quantized(
        batch1, levels, {"llamacpp-q4_0": [200.0, 300.0, 500.0], "genai-int4": []}, streams=16
    )
    ratios = out["ratios"]["128/128"]
    assert ratios["int4 ÷ Q4_0"] == pytest.approx(0.75)
    assert ratios["int4 ÷ genai int4"] == pytest.approx(1.2)
    assert ratios["int4 4-bit head ÷ genai int4"] == pytest.approx(1.5)
    assert ratios["int4 ÷ fp32"] == pytest.approx(3.0)
    assert ratios["int8 ÷ Q8_0"] is None  # no llama.cpp Q8_0 in this run
    # At 16 streams: the servers' levels and the peers' median rate (300) side by side.
    assert out["tok_s"]["16 streams"]["engine-int4"]["median"] == 400.0
    assert out["ratios"]["16 streams"]["int4 ÷ Q4_0"] == pytest.approx(400 / 300)
    assert out["ratios"]["16 streams"]["int4 ÷ fp32"] == pytest.approx(2.5)
    assert "genai-int4" not in out["tok_s"]["16 streams"]  # no repetition measured
    targets = quantized_target_values(out)
    assert targets["engine int4 ÷ fp32 decode"] == pytest.approx(3.0)
    table = "\n".join(quantized_markdown(out, batch1))
    assert (
        "| aggregate decode tok/s, 16 streams | 160 | n/a | 400 | n/a | n/a | n/a | 300 (200–500) | 1.33× |"
        in table
    )


def test_llama_batched_bench_gives_the_aggregate_decode_rate_of_its_one_matching_result() -> None:
    line = (
        '{"n_kv_max": 4096, "n_threads": 2, "pp": 128, "tg": 128, "pl": 16, "n_kv": 4096, '
        '"t_pp": 1.0, "speed_pp": 2048.0, "t_tg": 4.0, "speed_tg": 512.0, "t": 5.0, "speed": 819.2}'
    )
    text = f"llama_model_loader: loaded\n{line}\nmain: done\n"
    assert parallel_decode_rate(text, 128, 128, 16, threads=2) == 512.0
    with pytest.raises(LlamaBenchError, match="pl 8"):
        parallel_decode_rate(text, 128, 128, 8, threads=2)
    with pytest.raises(LlamaBenchError, match="threads"):
        parallel_decode_rate(text, 128, 128, 16, threads=4)


def test_words_prompt_has_exactly_the_words_asked_for() -> None:
    text = words_prompt(7, random.Random(3), ["alpha", "beta", "gamma"])
    assert len(text.split(" ")) == 7 and set(text.split(" ")) <= {"alpha", "beta", "gamma"}


def test_digits_give_one_token_each_and_a_long_prompt_fits_the_card() -> None:
    import mistral_common
    import sentencepiece

    spm = sentencepiece.SentencePieceProcessor(
        model_file=str(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1")
    )
    text = digits_of_length(3000, spm.encode, random.Random(5))
    assert len(spm.encode(text)) == 3000 and len(text) == 2999 and text.isdigit()
    with pytest.raises(ValueError, match="digit splitting"):
        digits_of_length(3000, lambda text: [0] * (len(text) // 2), random.Random(5))


# -- stamps: when the bench makes its models again ---------------------------------------------------


def test_fingerprint_follows_the_bytes_not_the_writes(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x00" * 1000)
    (tmp_path / "config.json").write_text("{}")
    before = files_fingerprint(tmp_path, "*.safetensors")
    weights.write_bytes(b"\x00" * 1000)  # the demo checkpoint rebuilt: the same bytes again
    assert files_fingerprint(tmp_path, "*.safetensors") == before
    weights.write_bytes(b"\x00" * 999 + b"\x01")
    assert files_fingerprint(tmp_path, "*.safetensors") != before
    assert "config.json" in files_fingerprint(tmp_path, "*") and "config.json" not in before


def test_exporter_digest_changes_with_the_exporter_source(tmp_path: Path) -> None:
    package = tmp_path / "export" / "textgen_export"
    package.mkdir(parents=True)
    (package / "native_graph.py").write_text("A = 1\n")
    before = exporter_digest(tmp_path)
    assert exporter_digest(tmp_path) == before
    (package / "native_graph.py").write_text("A = 2\n")
    assert exporter_digest(tmp_path) != before


def test_the_report_names_the_commit_it_measured() -> None:
    import subprocess

    from bench.machine import machine_info

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
    assert machine_info(2)["commit"].removesuffix("+changes") == head.stdout.strip()


def test_bytes_per_token_count_position_tables_as_one_row(tmp_path: Path) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from bench.beyond_llc import graph_bytes_per_token

    def weight(name: str, shape: tuple[int, ...], dtype: type = np.float32) -> onnx.TensorProto:
        return numpy_helper.from_array(np.zeros(shape, dtype=dtype), name)

    initializers = [
        weight("embed", (100, 8)),  # a Gather's table: one row, 32 bytes
        weight("w", (8, 8)),  # a MatMul's: all of it, 256 bytes
        weight("cos", (64, 4)),  # GroupQueryAttention's rotary caches: a row each, 16 bytes
        weight("sin", (64, 4)),
        weight("packed", (8, 1, 16), np.uint8),  # int4 blocks: all, 128 bytes
    ]
    nodes = [
        helper.make_node("Gather", ["embed", "ids"], ["h"]),
        helper.make_node("MatMul", ["h", "w"], ["q"]),
        helper.make_node(
            "GroupQueryAttention",
            ["q", "q", "q", "pk", "pv", "seqlens", "total", "cos", "sin"],
            ["o", "k", "v"],
            domain="com.microsoft",
        ),
        helper.make_node("Identity", ["packed"], ["p"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])], [], initializers
    )
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert graph_bytes_per_token(path) == 32 + 256 + 16 + 16 + 128


def test_the_wide_model_has_the_fewest_layers_that_pass_the_llc_multiple() -> None:
    from bench.beyond_llc import layers_for

    mib = 2**20
    # A Mistral-7B layer is 218 M weights (872 MB in fp32), its LM head 131 M (524 MB).
    assert layers_for(480 * mib, "fp32") == 2  # 4 x 503 MB = 2.01 GB: 1 layer + head is 1.40 GB
    assert layers_for(32 * mib, "fp32") == 1
    assert layers_for(480 * mib, "int4") > layers_for(480 * mib, "int8") > layers_for(480 * mib, "fp32")


def _beyond_llc_rounds() -> list[dict[str, float]]:
    from bench.roofline import roofline_share

    per_token = 2_270_000_000
    rounds = [(30e9, 12.0), (32e9, 13.0), (31e9, 11.0)]
    return [
        {"bandwidth": bw, "tok_s": rate, "share": roofline_share(per_token, rate, bw)} for bw, rate in rounds
    ]


def test_the_rounds_beyond_the_llc_give_the_median_share_and_its_range() -> None:
    from bench.beyond_llc import summarize

    out = summarize("models/bench-wide-L2-fp32", 2_270_000_000, 480 << 20, _beyond_llc_rounds())
    shares = sorted([2.27 * 12 / 30, 2.27 * 13 / 32, 2.27 * 11 / 31])
    assert out["median_share"] == pytest.approx(shares[1])
    assert (out["min_share"], out["max_share"]) == pytest.approx((shares[0], shares[2]))
    assert out["times_llc"] == pytest.approx(2.27e9 / (480 << 20))
    assert summarize("m", 100, None, _beyond_llc_rounds())["times_llc"] is None


def test_the_report_gives_the_roofline_beyond_the_llc_where_the_bench_model_fits_in_it() -> None:
    from bench.beyond_llc import summarize
    from bench.report import _beyond_llc_line

    beyond = summarize("models/bench-wide-L2-fp32", 2_270_000_000, 480 << 20, _beyond_llc_rounds())
    line = _beyond_llc_line(beyond)
    assert line is not None
    assert "models/bench-wide-L2-fp32" in line and "2.27 GB" in line and "4.5× the 480 MiB LLC" in line
    assert "11.0–13.0 tok/s against 30.0–32.0 GB/s" in line
    assert f"median **{beyond['median_share'] * 100:.0f}%**" in line and "over 3 rounds" in line
    assert _beyond_llc_line({"skipped": "the bench model's own roofline row applies"}) is None
    assert "not measured (disk full)" in (_beyond_llc_line({"unavailable": "disk full"}) or "")
    # The 90% target reads the share beyond the LLC where the bench model's own row does not apply...
    summary: dict[str, Any] = {
        **_summary_for_roofline(480 << 20, {"engine": 1.06}),
        "grpc": {},
        "concurrency": {},
        "constrained": {},
        "serving": {},
        "beyond_llc": beyond,
    }
    assert _targets(summary)["roofline share"]["value"] == pytest.approx(beyond["median_share"])
    assert _targets({**summary, "beyond_llc": {"skipped": "quick"}})["roofline share"]["value"] is None
    # ... and the bench model's own share where it does.
    applies = {**summary, **_summary_for_roofline(32 << 20, {"engine": 0.8})}
    assert _targets(applies)["roofline share"]["value"] == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--genai-model", "somewhere"], "--genai-model goes with --model"),
        (["--model", "models/bench-wide"], "--model needs a peer on the same checkpoint"),
        (["--model", "models/bench-wide", "--genai-model", "{tmp}"], "no genai_config.json there"),
        (["--streams", "16"], "--streams compares this engine with --other-source's"),
        (["--streams", "-1"], "--streams -1: must be at least 1"),
        (["--streams", "16", "--other-source", "{tmp}", "--model", "{tmp}"], "no textgen.json there"),
    ],
)
def test_pair_refuses_a_model_without_a_peer_on_its_checkpoint(
    argv: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench.pair import main

    with pytest.raises(SystemExit) as exit_info:
        main([arg.format(tmp=tmp_path) for arg in argv])
    assert exit_info.value.code == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize(
    ("rounds", "llc_bytes", "why"),
    [
        (0, 480 << 20, "left out"),  # --no-beyond-llc, or a quick run
        (8, 32 << 20, "the bench model's own roofline row applies"),  # 162 MB is 4.8x a 32 MiB L3
        (8, None, "the bench model's own roofline row applies"),  # unknown: the row says so itself
    ],
)
def test_make_bench_runs_the_rounds_beyond_the_llc_only_where_the_bench_model_fits_in_it(
    rounds: int, llc_bytes: int | None, why: str, tmp_path: Path
) -> None:
    import dataclasses

    from bench.config import FULL
    from bench.run import RawResults, Runner

    config = dataclasses.replace(FULL, beyond_llc_rounds=rounds)
    llc = None if llc_bytes is None else {"level": 3, "size_bytes": llc_bytes}
    raw = RawResults(
        config=config, machine={"last_level_cache": llc}, weights={"bytes_per_token": 162_041_856}
    )
    Runner(config, tmp_path, tmp_path / "logs", 60)._beyond_llc(raw)  # would build a 2 GB model otherwise
    assert why in raw.beyond_llc["skipped"]
