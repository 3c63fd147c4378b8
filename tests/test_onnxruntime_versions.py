"""Every graph the exporter writes loads, and decodes the same, in both onnxruntime builds.

onnxruntime 1.32 (the CPU wheel, this virtualenv) and onnxruntime-gpu 1.31.1 (the newest GPU wheel,
in .venv-ort-gpu, running here on its CPU provider) accept different IR versions and opsets: a graph
stamped with the onnx package's own newest IR version (kv_join.onnx once carried IR 14) loads in one
and is refused by the other, so `--provider cuda` would fail on every model; 1.32's
GroupQueryAttention also has inputs 1.31.1's lacks. The GPU wheel's side runs in a subprocess
(tests/ort_gpu_probe.py) over every `*.onnx` in each model directory: the demo in fp32, whose
greedy tokens must equal transformers', and with int4 and int8 weights (MatMulNBits), whose tokens
must equal the CPU wheel's, and with LoRA adapter slots, whose tokens with a mix of random adapters
and the base model in one batch must equal the CPU wheel's too.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import pytest
import torch
from greedy import engine_greedy, engine_greedy_rows, random_prompt, transformers_greedy
from onnx import helper
from ort_runtimes import REPO, assert_server_refuses_cuda, code_env, gpu_venv_python, pinned_version
from random_adapters import random_adapter
from textgen_server.engine import Engine
from textgen_server.lora_format import load_adapter, save_adapter
from textgen_server.model_config import KV_COPY_FILE, MODEL_FILE, ModelConfig
from transformers import MistralForCausalLM

# IR 10 is ONNX 1.16's; both runtimes load it (onnxruntime-gpu 1.31.1 stops at 13).
MAX_IR_VERSION = 10
# The newest standard opset of an ONNX release on IR <= 10 (ONNX 1.16: opset 21); both implement it.
MAX_OPSET = max(row[2] for row in helper.VERSION_TABLE if row[1] <= MAX_IR_VERSION)
# onnxruntime's contrib operators (GroupQueryAttention, MatMulNBits, ...) have one opset version.
CONTRIB_OPSETS = {"com.microsoft": 1}

PROMPTS = [random_prompt(length, seed=length) for length in (1, 17, 300)]
NEW_TOKENS = 32


# With adapter slots: two random adapters in slots 1 and 2, rows through slots 1, 0 and 2.
ADAPTER_ROWS = [1, 0, 2]


@pytest.fixture(scope="module")
def model_dirs(
    tiny_model_dir: Path, quantized_model_dir: Callable[[str], Path], lora_model_dir: Path
) -> dict[str, Path]:
    """The demo model as the exporter writes it, by weight dtype, and with LoRA adapter slots."""
    return {
        "fp32": tiny_model_dir,
        **{dtype: quantized_model_dir(dtype) for dtype in ("int4", "int8")},
        "lora": lora_model_dir,
    }


@pytest.fixture(scope="module")
def adapter_files(lora_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    config = ModelConfig.load(lora_model_dir)
    directory = tmp_path_factory.mktemp("adapters")
    return [save_adapter(random_adapter(config, rank, seed=rank), directory / f"r{rank}") for rank in (4, 16)]


@pytest.mark.parametrize("weight_dtype", ["fp32", "int4", "int8", "lora"])
def test_every_graph_declares_an_ir_version_and_opsets_both_runtimes_load(
    model_dirs: dict[str, Path], weight_dtype: str
) -> None:
    graphs = sorted(model_dirs[weight_dtype].glob("*.onnx"))
    assert {path.name for path in graphs} >= {MODEL_FILE, KV_COPY_FILE}
    for path in graphs:
        model = onnx.load(str(path), load_external_data=False)
        assert model.ir_version <= MAX_IR_VERSION, f"{path.name}: IR version {model.ir_version}"
        for opset in model.opset_import:
            if opset.domain in ("", "ai.onnx"):
                assert opset.version <= MAX_OPSET, f"{path.name}: opset {opset.version} > {MAX_OPSET}"
            else:
                assert CONTRIB_OPSETS.get(opset.domain) == opset.version, (
                    f"{path.name}: opset {opset.domain!r} {opset.version}, not one both runtimes know"
                )
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # this virtualenv's runtime


@pytest.fixture(scope="module")
def gpu_wheel_report(model_dirs: dict[str, Path], adapter_files: list[Path]) -> dict[str, Any]:
    """tests/ort_gpu_probe.py's report from .venv-ort-gpu: graph load errors and greedy tokens."""
    request = {
        "model_dirs": [str(model_dir) for model_dir in model_dirs.values()],
        "prompts": PROMPTS,
        "new_tokens": NEW_TOKENS,
        "adapters": {str(model_dirs["lora"]): [str(path) for path in adapter_files]},
        "adapter_rows": ADAPTER_ROWS,
    }
    result = subprocess.run(
        [str(gpu_venv_python()), str(REPO / "tests" / "ort_gpu_probe.py")],
        input=json.dumps(request),
        env=code_env(CUDA_VISIBLE_DEVICES=""),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_gpu_virtualenv_runs_the_pinned_onnxruntime_gpu(gpu_wheel_report: dict[str, Any]) -> None:
    version = pinned_version("onnxruntime-gpu", "gpu")
    # The CPU wheel beside it would shadow the GPU one (both install the `onnxruntime` module).
    assert gpu_wheel_report["distributions"] == {"onnxruntime-gpu": version}
    assert gpu_wheel_report["version"] == version
    assert "CUDAExecutionProvider" in gpu_wheel_report["available_providers"]


def test_cpu_virtualenv_runs_the_pinned_onnxruntime() -> None:
    assert ort.__version__ == pinned_version("onnxruntime", "server")


@pytest.mark.parametrize("weight_dtype", ["fp32", "int4", "int8", "lora"])
def test_every_graph_loads_under_onnxruntime_gpu(
    gpu_wheel_report: dict[str, Any], model_dirs: dict[str, Path], weight_dtype: str
) -> None:
    model_dir = model_dirs[weight_dtype]
    graphs = gpu_wheel_report["models"][str(model_dir)]["graphs"]
    assert sorted(graphs) == sorted(path.name for path in model_dir.glob("*.onnx"))
    assert {name: error for name, error in graphs.items() if error} == {}


def test_greedy_parity_with_transformers_under_onnxruntime_gpu(
    gpu_wheel_report: dict[str, Any], model_dirs: dict[str, Path]
) -> None:
    reference = MistralForCausalLM.from_pretrained(model_dirs["fp32"] / "checkpoint", dtype=torch.float32)
    expected = [transformers_greedy(reference.eval(), prompt, NEW_TOKENS) for prompt in PROMPTS]
    result = gpu_wheel_report["models"][str(model_dirs["fp32"])]
    assert "engine_error" not in result, result.get("engine_error")
    assert result["alone"] == expected
    assert result["batched"] == expected  # rows at different positions in one decode


@pytest.mark.parametrize("weight_dtype", ["int4", "int8"])
def test_quantized_greedy_equals_the_cpu_wheels_under_onnxruntime_gpu(
    gpu_wheel_report: dict[str, Any], model_dirs: dict[str, Path], weight_dtype: str
) -> None:
    """No transformers reference for MatMulNBits weights: the two runtimes must agree instead."""
    engine = Engine(model_dirs[weight_dtype], provider="cpu", slots=len(PROMPTS), host_arrays=False)
    expected = [engine_greedy(engine, prompt, NEW_TOKENS) for prompt in PROMPTS]
    result = gpu_wheel_report["models"][str(model_dirs[weight_dtype])]
    assert "engine_error" not in result, result.get("engine_error")
    assert result["alone"] == expected
    assert result["batched"] == engine_greedy_rows(engine, PROMPTS, NEW_TOKENS) == expected


def test_adapters_mixed_with_the_base_model_decode_the_same_under_onnxruntime_gpu(
    gpu_wheel_report: dict[str, Any], model_dirs: dict[str, Path], adapter_files: list[Path]
) -> None:
    """Adapter slots bound by pointer, a base-only pass binding none (K = 0), and rows of different
    adapters in one pass: the GPU wheel's tokens equal the CPU wheel's."""
    engine = Engine(model_dirs["lora"], provider="cpu", slots=len(PROMPTS), host_arrays=False)
    for slot, path in enumerate(adapter_files, start=1):
        engine.load_adapter(slot, load_adapter(path, engine.config))
    expected = engine_greedy_rows(engine, PROMPTS, NEW_TOKENS, adapters=ADAPTER_ROWS)
    base = engine_greedy_rows(engine, PROMPTS, NEW_TOKENS)
    assert [expected[i] != base[i] for i in range(len(PROMPTS))] == [True, False, True]
    result = gpu_wheel_report["models"][str(model_dirs["lora"])]
    assert "engine_error" not in result, result.get("engine_error")
    assert result["batched"] == base
    assert result["with_adapters"] == expected


def test_server_under_onnxruntime_gpu_refuses_cuda_it_cannot_start(tiny_model_dir: Path) -> None:
    assert_server_refuses_cuda(gpu_venv_python(), tiny_model_dir)


def test_the_code_comes_first_on_pythonpath_and_what_was_there_stays(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU machine without network has its wheels in a folder on PYTHONPATH
    (scripts/gpu_device_check.sh): the server processes the tests start must still find them."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/tmp/wheels", ""]))
    entries = code_env()["PYTHONPATH"].split(os.pathsep)
    assert entries == [str(REPO / "server"), str(REPO / "sdk"), str(REPO / "tests"), "/tmp/wheels"]
