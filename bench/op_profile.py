"""Where a decode step's time goes: onnxruntime's profiler over this engine's one-token steps.

    python -m bench.op_profile [--model models/bench] [--rows 1] [--prompt 128] [--steps 200]

Prefills `--rows` prompts, then runs `--steps` decode steps of all rows with the session's profiler
on, and prints the kernel time per step by op type and, for every matrix product with at least
1 MB of weights, the rate at which it reads them (weight bytes ÷ kernel time) and the rate at which
it multiplies (2 × rows × its multiply-adds a row ÷ kernel time). Beside them: the read bandwidth of
a numpy sum on as many threads just before and just after (`bench.membw`; it differs from minute to
minute on a shared machine, so only figures taken together compare), and the rate of a large fp32
MatMul in onnxruntime on the same threads (`bench.flops`). Together they say whether a decode step
is bound by its weight reads, by arithmetic, or by the work around them. The profiler's own cost
makes the step a little slower than in `make bench`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .flops import ROWS, K, N, matmul_flops

REPO = Path(__file__).resolve().parent.parent
WEIGHT_BYTES_SHOWN = 1_000_000  # products reading less are dispatch cost, not reads: left out of the rates
# Ops that read all of their weights each step (Gather reads one embedding row; attention's rotary
# tables are read in part).
MATRIX_PRODUCTS = frozenset({"MatMul", "MatMulNBits", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul"})
BANDWIDTH_BYTES = 1 << 30
BANDWIDTH_REPS = 5
MATMUL_REPS = 10


@dataclass(frozen=True)
class OpTime:
    op_type: str
    nodes: int  # nodes of this type that ran in each step
    us_per_step: float


@dataclass(frozen=True)
class NodeRead:
    node: str
    op_type: str
    weight_bytes: int
    us_median: float
    flops: int = 0  # per step: 2 x rows x the node's multiply-adds a row (0: not known)

    @property
    def gb_s(self) -> float:
        return self.weight_bytes / self.us_median / 1e3

    @property
    def gflop_s(self) -> float:
        return self.flops / self.us_median / 1e3


@dataclass(frozen=True)
class StepProfile:
    steps: int
    run_us_median: float  # one whole step (onnxruntime's model_run), median over the steps
    by_op: list[OpTime]  # slowest first
    reads: list[NodeRead]  # the matrix products with weights, in graph order
    bandwidth_bytes_s: list[float] = field(default_factory=list)  # numpy sums just before and after
    matmul_flops_s: list[float] = field(default_factory=list)  # bench.flops, just before


def weight_bytes_by_node(model_path: Path) -> dict[str, int]:
    """Bytes of the initializers each node reads (external data is sized, not loaded)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(model_path), load_external_data=False)
    sizes = {
        init.name: int(np.prod(init.dims, dtype=np.int64))
        * np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
        for init in model.graph.initializer
    }
    return {
        node.name: sum(sizes.get(name, 0) for name in node.input)
        for node in model.graph.node
        if any(name in sizes for name in node.input)
    }


def multiply_adds_by_node(model_path: Path) -> dict[str, int]:
    """Multiply-adds a row of input costs each matrix product with a weight initializer: K x N of
    a MatMul's or Gemm's 2-D weights, or of a MatMulNBits' K and N attributes."""
    import onnx
    from onnx import helper

    model = onnx.load(str(model_path), load_external_data=False)
    dims = {init.name: list(init.dims) for init in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            found[node.name] = int(attrs["K"]) * int(attrs["N"])
        elif node.op_type in MATRIX_PRODUCTS:
            weights = [dims[name] for name in node.input if len(dims.get(name, [])) == 2]
            if weights:
                found[node.name] = int(np.prod(weights[0], dtype=np.int64))
    return found


def summarize(
    events: list[dict[str, Any]],
    weight_bytes: dict[str, int],
    last_runs: int,
    multiply_adds: dict[str, int] | None = None,
    rows: int = 1,
) -> StepProfile:
    """The last `last_runs` model runs of an onnxruntime profile (`events`, its JSON list): time per
    step by op type and each weighted node's median kernel time (and FLOPs a step, for the nodes
    `multiply_adds` gives multiply-adds a row for, at `rows` rows)."""
    runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
        key=lambda e: int(e["ts"]),
    )[-last_runs:]
    if len(runs) < last_runs:
        raise ValueError(f"the profile holds {len(runs)} model runs, fewer than the {last_runs} asked for")
    windows = [(int(r["ts"]), int(r["ts"]) + int(r["dur"])) for r in runs]

    def in_runs(ts: int) -> bool:
        return any(start <= ts <= end for start, end in windows)

    op_us: defaultdict[str, float] = defaultdict(float)
    op_nodes: defaultdict[str, int] = defaultdict(int)
    node_us: defaultdict[str, list[float]] = defaultdict(list)
    node_op: dict[str, str] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        if not in_runs(int(e["ts"])):
            continue
        op, node = e["args"]["op_name"], e["name"].removesuffix("_kernel_time")
        op_us[op] += float(e["dur"])
        op_nodes[op] += 1
        node_us[node].append(float(e["dur"]))
        node_op[node] = op
    by_op = sorted(
        (OpTime(op, op_nodes[op] // last_runs, us / last_runs) for op, us in op_us.items()),
        key=lambda t: -t.us_per_step,
    )
    macs = multiply_adds or {}
    reads = [
        NodeRead(
            node,
            node_op[node],
            weight_bytes[node],
            statistics.median(node_us[node]),
            2 * rows * macs.get(node, 0),
        )
        for node in weight_bytes  # graph order
        if node in node_us and node_op[node] in MATRIX_PRODUCTS and weight_bytes[node] >= WEIGHT_BYTES_SHOWN
    ]
    return StepProfile(last_runs, statistics.median(int(r["dur"]) for r in runs), by_op, reads)


def markdown_lines(profile: StepProfile) -> list[str]:
    lines = [
        f"{profile.steps} steps, one step {profile.run_us_median / 1e3:.2f} ms (median)",
        "",
        "| op type | nodes | ms per step | share of the step |",
        "|---|---|---|---|",
    ]
    for t in profile.by_op:
        share = t.us_per_step / profile.run_us_median
        lines.append(f"| {t.op_type} | {t.nodes} | {t.us_per_step / 1e3:.3f} | {share:.0%} |")
    if profile.bandwidth_bytes_s:
        samples = profile.bandwidth_bytes_s
        lines += [
            "",
            (
                f"numpy sum, same threads, just before and after: median "
                f"{statistics.median(samples) / 1e9:.1f} GB/s, best {max(samples) / 1e9:.1f} GB/s "
                f"({len(samples)} passes)"
            ),
        ]
    if profile.matmul_flops_s:
        samples = profile.matmul_flops_s
        lines.append(
            f"onnxruntime fp32 MatMul {ROWS} x {K} x {N}, same threads, just before: median "
            f"{statistics.median(samples) / 1e9:.0f} GFLOP/s, best {max(samples) / 1e9:.0f} GFLOP/s "
            f"({len(samples)} runs)"
        )
    if profile.reads:
        total_bytes = sum(r.weight_bytes for r in profile.reads)
        total_us = sum(r.us_median for r in profile.reads)
        total_flops = sum(r.flops for r in profile.reads)
        lines += [
            "",
            (
                f"Weight reads: {total_bytes / 1e6:.1f} MB in {total_us / 1e3:.2f} ms = "
                f"{total_bytes / total_us / 1e3:.1f} GB/s and {total_flops / total_us / 1e3:.0f} GFLOP/s over "
                "the matrix products below (medians)"
            ),
            "",
            "| node | op type | weights MB | µs | GB/s | GFLOP/s |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r.node} | {r.op_type} | {r.weight_bytes / 1e6:.1f} | {r.us_median:.0f} | {r.gb_s:.1f} "
            f"| {r.gflop_s:.0f} |"
            for r in profile.reads
        ]
    return lines


def profile_decode(
    model_dir: Path, rows: int, prompt: int, steps: int, threads: int, bandwidth_bytes: int = BANDWIDTH_BYTES
) -> StepProfile:
    """Decode steps of `rows` rows after prompts of `prompt` tokens, under the profiler, between two
    bandwidth measurements over `bandwidth_bytes`."""
    import onnxruntime as ort
    from textgen_server.engine import Engine, session_options
    from textgen_server.model_config import MODEL_FILE

    from .membw import read_bandwidth

    matmul = matmul_flops(threads, MATMUL_REPS)
    bandwidth = read_bandwidth(threads, bandwidth_bytes, BANDWIDTH_REPS)
    # Each row's slot as long as the server's (the model's max_total_tokens): attention sees the same buffers.
    engine = Engine(model_dir, provider="cpu", threads=threads, slots=rows)
    with tempfile.TemporaryDirectory() as scratch:
        # The engine's own session options, with the profiler on.
        profiled = session_options(threads)
        profiled.enable_profiling = True
        profiled.profile_file_prefix = str(Path(scratch) / "decode")
        engine.session = ort.InferenceSession(
            str(model_dir / MODEL_FILE), sess_options=profiled, providers=engine.session.get_providers()
        )
        rng = np.random.default_rng(0)
        for row in range(rows):
            engine.prefill(row, rng.integers(3, engine.config.vocab_size, prompt).tolist())
        tokens = np.full(rows, 5, dtype=np.int64)  # [rows]
        for step in range(steps):
            engine.decode(tokens, np.full(rows, prompt + step, dtype=np.int64))
        events = json.loads(Path(engine.session.end_profiling()).read_text(encoding="utf-8"))
    bandwidth += read_bandwidth(threads, bandwidth_bytes, BANDWIDTH_REPS)
    model_path = model_dir / MODEL_FILE
    profile = summarize(
        events, weight_bytes_by_node(model_path), steps, multiply_adds_by_node(model_path), rows
    )
    return replace(profile, bandwidth_bytes_s=bandwidth, matmul_flops_s=matmul)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.op_profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", type=Path, default=REPO / "models" / "bench", help="a model directory")
    parser.add_argument("--rows", type=int, default=1, help="sequences decoded together (default 1)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens per row (default 128)")
    parser.add_argument("--steps", type=int, default=200, help="decode steps profiled (default 200)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    args = parser.parse_args(argv)
    if min(args.rows, args.prompt, args.steps, args.threads) < 1:
        parser.error("--rows, --prompt, --steps and --threads must be at least 1")
    if not (args.model / "textgen.json").is_file():
        parser.error(f"{args.model}: no model directory (make bench builds models/bench)")
    profile = profile_decode(args.model, args.rows, args.prompt, args.steps, args.threads)
    print("\n".join(markdown_lines(profile)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
