"""The GPU section: this engine on the CUDA provider, fp16, a random-weight model of Mistral-7B's shape.

Runs only where onnxruntime offers CUDA; anywhere else the section is recorded as skipped. The peers
stay on the CPU sections (this venv's torch is a CPU build, genai's CUDA package is another install),
so here the figure is decode tokens/s and its share of HBM read bandwidth, measured by an ORT
ReduceSum over a large device tensor in the same run.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .prompts import prompt_ids
from .roofline import read_checkpoint_tensors, roofline_share, weight_traffic
from .stats import run_timing, spread

MODEL = Path("models/bench-7b-fp16")
TRAFFIC_FILE = "bench-weight-traffic.json"
CASES = ((128, 128), (2048, 128))
REPS = 3
FP16_BYTES_PER_FP32 = 0.5  # the checkpoint is written in fp32; the served graph holds fp16 weights


def gpu_section(repo: Path, threads: int) -> dict[str, Any]:
    import onnxruntime as ort

    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return {"skipped": f"no GPU on this machine (onnxruntime offers {', '.join(providers)})"}
    try:
        return _measure(repo, threads)
    except Exception as exc:  # noqa: BLE001 - a GPU section that fails must not lose the CPU results
        return {"skipped": f"a GPU is present but the GPU section failed: {type(exc).__name__}: {exc}"}


def _measure(repo: Path, threads: int) -> dict[str, Any]:
    from .peers.client import Worker

    model_dir = _ensure_model(repo / MODEL)
    traffic = json.loads((model_dir / TRAFFIC_FILE).read_text(encoding="utf-8"))
    bandwidth = hbm_read_bandwidth(1 << 30, reps=10)
    best = max(bandwidth)
    worker = Worker(
        "engine",
        Path(sys.executable),
        model_dir,
        threads,
        repo,
        repo / "bench/logs/engine-gpu.log",
        provider="cuda",
    )
    rng = random.Random(7)
    cases: dict[str, Any] = {}
    try:
        worker.call("generate", prompt_ids=prompt_ids(128, rng), new_tokens=8)
        for prompt, new in CASES:
            runs = [
                run_timing(worker.call("generate", prompt_ids=prompt_ids(prompt, rng), new_tokens=new))
                for _ in range(REPS)
            ]
            decode = spread([r.decode_tok_s for r in runs])
            cases[f"{prompt}/{new}"] = {
                "decode_tok_s": decode.to_dict(),
                "ttft_s": spread([r.ttft_s for r in runs]).to_dict(),
                "hbm_roofline_share": roofline_share(traffic["bytes_per_token"], decode.median, best),
            }
    finally:
        worker.close()
    return {
        "model": str(MODEL),
        "dtype": "fp16",
        "provider": worker.info.get("provider"),
        "weights": traffic,
        "hbm_read_bandwidth_bytes_s": {"max": best, "samples": bandwidth},
        "batch1": cases,
    }


def _ensure_model(out: Path) -> Path:
    if (out / "textgen.json").is_file() and (out / TRAFFIC_FILE).is_file():
        return out
    from textgen_export.demo import write_demo_checkpoint
    from textgen_export.onnx_export import export_checkpoint

    with tempfile.TemporaryDirectory(prefix="bench-7b-") as tmp:
        checkpoint = Path(tmp) / "checkpoint"
        write_demo_checkpoint("7b", checkpoint)
        traffic = weight_traffic(read_checkpoint_tensors(checkpoint)).to_dict()
        traffic["bytes_per_token"] = int(traffic["bytes_per_token"] * FP16_BYTES_PER_FP32)  # type: ignore[operator]
        traffic["parameter_bytes"] = int(traffic["parameter_bytes"] * FP16_BYTES_PER_FP32)  # type: ignore[operator]
        export_checkpoint(
            checkpoint,
            out,
            dtype="fp16",
            name="textgen-demo-7b-fp16",
            source="random weights, size 7b",
            overwrite=True,
        )
    (out / TRAFFIC_FILE).write_text(json.dumps(traffic, indent=2), encoding="utf-8")
    return out


def hbm_read_bandwidth(size_bytes: int, reps: int) -> list[float]:
    """Bytes/s of ReduceSum over a device-resident fp32 tensor (read once per run) on the CUDA provider."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    n = size_bytes // 4
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)],
        "read",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
    x = ort.OrtValue.ortvalue_from_numpy(np.ones(n, dtype=np.float32), "cuda", 0)
    binding = session.io_binding()
    binding.bind_ortvalue_input("x", x)
    binding.bind_output("y", "cuda")
    session.run_with_iobinding(binding)  # warm-up: kernel selection
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        session.run_with_iobinding(binding)  # synchronous: returns once the kernel is done
        samples.append(n * 4 / (time.perf_counter() - start))
    return samples
