"""bench.op_profile: the profile's arithmetic on hand-made events, and a real profile of the tiny demo
read back against the graph it ran (structure, never timings)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.flops import matmul_flops
from bench.op_profile import (
    markdown_lines,
    multiply_adds_by_node,
    profile_decode,
    summarize,
    weight_bytes_by_node,
)


def _run(ts: int, dur: int) -> dict[str, Any]:
    return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}


def _node(name: str, op: str, ts: int, dur: int) -> dict[str, Any]:
    return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}


def _events() -> list[dict[str, Any]]:
    """A prefill run (left out), then two decode steps of a MatMul, a small MatMul, a Gather and an Add."""
    events = [_run(0, 900), _node("mm", "MatMul", 10, 800)]  # the prefill: outside the last two runs
    for start, mm_us in ((1000, 100), (2000, 300)):
        events += [
            _run(start, 500),
            _node("embed", "Gather", start + 1, 5),
            _node("mm", "MatMul", start + 10, mm_us),
            _node("small", "MatMul", start + 20, 7),
            _node("add", "Add", start + 30, 20),
        ]
    events.append({"cat": "Session", "name": "session_initialization", "ts": 0, "dur": 1})
    return events


WEIGHTS = {"embed": 65_000_000, "mm": 8_000_000, "small": 4_000}


def test_summarize_keeps_the_last_runs_and_divides_by_steps() -> None:
    profile = summarize(_events(), WEIGHTS, last_runs=2)
    assert profile.steps == 2 and profile.run_us_median == 500
    by_op = {t.op_type: t for t in profile.by_op}
    assert by_op["MatMul"].us_per_step == (100 + 7 + 300 + 7) / 2  # the prefill's 800 left out
    assert by_op["MatMul"].nodes == 2 and by_op["Add"].nodes == 1
    assert [t.op_type for t in profile.by_op] == ["MatMul", "Add", "Gather"]  # slowest first


def test_only_matrix_products_of_a_megabyte_or_more_count_as_reads() -> None:
    profile = summarize(_events(), WEIGHTS, last_runs=2)
    # Gather reads one row of its table, and a 4 KB product is dispatch cost: neither is a read.
    assert [(r.node, r.us_median) for r in profile.reads] == [("mm", 200)]
    assert profile.reads[0].gb_s == pytest.approx(8_000_000 / 200e-6 / 1e9)
    table = "\n".join(markdown_lines(profile))
    assert "| mm | MatMul | 8.0 | 200 | 40.0 | 0 |" in table
    assert "8.0 MB in 0.20 ms = 40.0 GB/s" in table


def test_flops_count_every_row() -> None:
    """2 FLOPs a multiply-add, for each of the rows decoded together."""
    profile = summarize(_events(), WEIGHTS, last_runs=2, multiply_adds={"mm": 2_000_000}, rows=16)
    assert profile.reads[0].flops == 2 * 16 * 2_000_000
    assert profile.reads[0].gflop_s == pytest.approx(64_000_000 / 200e-6 / 1e9)
    table = "\n".join(markdown_lines(profile))
    assert "| mm | MatMul | 8.0 | 200 | 40.0 | 320 |" in table
    assert "= 40.0 GB/s and 320 GFLOP/s over" in table


def test_the_matmul_reference_is_a_rate() -> None:
    rates = matmul_flops(threads=1, reps=2)
    assert len(rates) == 2 and all(1e8 < rate < 1e14 for rate in rates)


def test_summarize_refuses_a_profile_with_too_few_runs() -> None:
    with pytest.raises(ValueError, match="3 model runs, fewer than the 4"):
        summarize(_events(), WEIGHTS, last_runs=4)


def test_a_real_profile_matches_the_graph_it_ran(tiny_model_dir: Path) -> None:
    weights = weight_bytes_by_node(tiny_model_dir / "model.onnx")
    profile = profile_decode(tiny_model_dir, rows=2, prompt=5, steps=4, threads=1, bandwidth_bytes=1 << 20)
    assert profile.steps == 4 and len(profile.bandwidth_bytes_s) == 10
    by_op = {t.op_type: t for t in profile.by_op}
    layers = 2
    assert by_op["GroupQueryAttention"].nodes == layers
    # q/k/v, o, gate, up and down per layer, and the LM head; every decode step ran each once.
    assert by_op["MatMul"].nodes == 5 * layers + 1
    assert sum(t.us_per_step for t in profile.by_op) <= profile.run_us_median * 1.5
    # The tiny demo's only product of a megabyte or more is the LM head: 64 x 32000 fp32 weights.
    assert [(r.node, r.weight_bytes) for r in profile.reads] == [("lm_head", 64 * 32000 * 4)]
    assert weights["lm_head"] == 64 * 32000 * 4
    # Its multiply-adds: 64 x 32000 a row, for both rows.
    assert multiply_adds_by_node(tiny_model_dir / "model.onnx")["lm_head"] == 64 * 32000
    assert profile.reads[0].flops == 2 * 2 * 64 * 32000
    assert len(profile.matmul_flops_s) == 10


def test_multiply_adds_of_quantized_products_come_from_their_shape(
    tiny_model_dir: Path, quantized_model_dir: Callable[[str], Path]
) -> None:
    """MatMulNBits keeps its weights packed: its K and N attributes give the multiply-adds, which
    must be those of the fp32 product it replaced."""
    plain = multiply_adds_by_node(tiny_model_dir / "model.onnx")
    quantized = multiply_adds_by_node(quantized_model_dir("int4") / "model.onnx")
    renamed = {name.removesuffix("_Q4").removesuffix("_Q8"): macs for name, macs in quantized.items()}
    assert renamed == plain and len(plain) == 5 * 2 + 1  # q/k/v, o, gate, up, down; the LM head
