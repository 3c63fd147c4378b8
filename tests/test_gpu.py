"""The CUDA execution provider: the same greedy choices as the CPU, the KV cache on the device, no
silent fallback.

`make test-gpu` runs this file under onnxruntime-gpu (.venv-ort-gpu) on the demo model in fp32 and
fp16 (TEXTGEN_GPU_MODEL_DIRS) and exported with LoRA adapter slots (TEXTGEN_GPU_LORA_DIR). Tests marked `gpu` need a CUDA device: without one they are skipped,
with the reason (`-rs`); TEXTGEN_REQUIRE_CUDA=1 turns those skips into failures, for a run on a
machine that must have one. The refusal tests need no GPU and run in `make test` too.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
from greedy import engine_forced_logits, engine_greedy_rows, random_prompt
from ort_runtimes import REPO, assert_server_refuses_cuda
from random_adapters import random_adapter
from textgen_server.engine import Engine, ProviderError, preload_cuda_libraries
from textgen_server.model_config import MODEL_FILE, ModelConfig

NEW_TOKENS = 32
# Logits may differ from the CPU's by this share of their largest magnitude: CUDA's fp32 MatMuls use
# TF32 by default (10-bit mantissa, like fp16). On the CPU, the fp16 export's logits differ from
# fp32's by about 6e-4 of it on the demo model; a wrong mask or rotary table differs by order 1.
RELATIVE_TOLERANCE = {"fp32": 5e-3, "fp16": 1e-2}
PROMPT_BATCHES = [
    [random_prompt(1, seed=1)],
    [random_prompt(300, seed=300)],
    [random_prompt(n, seed=n) for n in (3, 40, 11)],  # rows at different positions in one decode
]
SLOTS = 4


@pytest.fixture(scope="module")
def model_dirs(request: pytest.FixtureRequest) -> dict[str, Path]:
    """Model directories by dtype: TEXTGEN_GPU_MODEL_DIRS (make test-gpu), else the session's demo model."""
    names = os.environ.get("TEXTGEN_GPU_MODEL_DIRS", "").split()
    dirs = [REPO / name for name in names] or [Path(request.getfixturevalue("tiny_model_dir"))]
    return {ModelConfig.load(model_dir).dtype: model_dir for model_dir in dirs}


@functools.cache
def _cuda_missing(model_dir: Path) -> str | None:
    """Why this onnxruntime cannot run `model_dir` on CUDA here, or None when it can."""
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        return (
            f"CUDAExecutionProvider is absent: onnxruntime {ort.__version__} offers {', '.join(available)} "
            "(make test-gpu runs these under onnxruntime-gpu)"
        )
    preload_cuda_libraries()  # as the engine does: else pip's CUDA libraries are not found
    session = ort.InferenceSession(
        str(model_dir / MODEL_FILE), providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return (
            f"onnxruntime-gpu {ort.__version__} could not start CUDA here (no GPU, or no CUDA 13 / cuDNN 9 "
            "libraries: its log says which)"
        )
    return None


def _skip_without_cuda(model_dir: Path) -> None:
    reason = _cuda_missing(model_dir)
    if reason is None:
        return
    if os.environ.get("TEXTGEN_REQUIRE_CUDA") == "1":
        pytest.fail(f"TEXTGEN_REQUIRE_CUDA=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module", params=["fp32", "fp16"])
def engines(request: pytest.FixtureRequest, model_dirs: dict[str, Path]) -> tuple[Engine, Engine]:
    """A CUDA engine and a CPU engine on the same model directory (one per dtype)."""
    dtype: str = request.param
    _skip_without_cuda(next(iter(model_dirs.values())))
    if dtype not in model_dirs:
        pytest.fail(f"no {dtype} model directory among {sorted(map(str, model_dirs.values()))}")
    return (
        Engine(model_dirs[dtype], provider="cuda", slots=SLOTS),
        Engine(model_dirs[dtype], provider="cpu", slots=SLOTS),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("prompts", PROMPT_BATCHES, ids=["prompt-1", "prompt-300", "batch-3-40-11"])
def test_cuda_greedy_choices_equal_the_cpus(engines: tuple[Engine, Engine], prompts: list[list[int]]) -> None:
    _assert_cuda_chooses_as_the_cpu(*engines, prompts)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [1, 64], ids=["token-by-token", "chunks-of-64"])
def test_cuda_prefill_in_chunks_chooses_as_the_cpu(engines: tuple[Engine, Engine], chunk: int) -> None:
    """Several new tokens over a cache that already holds some, as the scheduler's chunked prefill
    and a prefix cache hit run them: GroupQueryAttention's path for a later prompt, batch 1, on CUDA
    (the CPU side prefills each prompt whole)."""
    _assert_cuda_chooses_as_the_cpu(*engines, [random_prompt(300, seed=300)], cuda_chunk=chunk)


def _assert_cuda_chooses_as_the_cpu(
    cuda: Engine,
    cpu: Engine,
    prompts: list[list[int]],
    adapters: list[int] | None = None,
    cuda_chunk: int = 10_000,
) -> None:
    tokens = engine_greedy_rows(cpu, prompts, NEW_TOKENS, adapters=adapters)  # [rows][step]
    # Both engines are fed the CPU's tokens, so every step compares logits after the same prefix.
    cpu_logits = engine_forced_logits(cpu, prompts, tokens, adapters)  # [steps, rows, vocab]
    cuda_logits = engine_forced_logits(cuda, prompts, tokens, adapters, chunk=cuda_chunk)
    tolerance = RELATIVE_TOLERANCE[cpu.config.dtype] * float(np.abs(cpu_logits).max())
    assert float(np.abs(cuda_logits - cpu_logits).max()) <= tolerance
    # CUDA's greedy choice is the CPU's wherever the CPU's best two are further apart than rounding.
    top2: npt.NDArray[np.float32] = np.sort(cpu_logits, axis=-1)[..., -2:]  # [steps, rows, 2]
    decided = top2[..., 1] - top2[..., 0] > 2 * tolerance  # [steps, rows]
    expected = np.array(tokens).T  # [steps, rows]
    assert np.array_equal(cuda_logits.argmax(axis=-1)[decided], expected[decided])


@pytest.fixture(scope="module")
def lora_engines(request: pytest.FixtureRequest) -> tuple[Engine, Engine]:
    """CUDA and CPU engines on a model with adapter slots (TEXTGEN_GPU_LORA_DIR, make test-gpu; else the
    session's), random adapters of ranks 4 and 16 in slots 1 and 2 of both."""
    name = os.environ.get("TEXTGEN_GPU_LORA_DIR")
    model_dir = REPO / name if name else Path(request.getfixturevalue("lora_model_dir"))
    _skip_without_cuda(model_dir)
    engines = Engine(model_dir, provider="cuda", slots=SLOTS), Engine(model_dir, provider="cpu", slots=SLOTS)
    for slot, rank in ((1, 4), (2, 16)):
        weights = random_adapter(engines[1].config, rank, seed=rank)
        for engine in engines:
            engine.load_adapter(slot, weights)
    return engines


@pytest.mark.gpu
def test_cuda_adapters_mixed_with_the_base_model_choose_as_the_cpu(
    lora_engines: tuple[Engine, Engine],
) -> None:
    """Adapter stacks on the device, bound by pointer, a slot range per pass, none for base rows alone."""
    cuda, cpu = lora_engines
    assert cuda.lora is not None and {v.device_name() for v in cuda.lora._device_values.values()} == {"cuda"}
    prompts = PROMPT_BATCHES[2]
    _assert_cuda_chooses_as_the_cpu(cuda, cpu, prompts, adapters=[1, 0, 2])  # slots 1..2 bound
    _assert_cuda_chooses_as_the_cpu(cuda, cpu, prompts, adapters=[2, 2, 0])  # slot 2 alone
    _assert_cuda_chooses_as_the_cpu(cuda, cpu, prompts)  # no slot bound: K = 0
    # A slot rewritten between passes (a new adapter loaded) reaches the device.
    replacement = random_adapter(cpu.config, 8, seed=8)
    for engine in (cuda, cpu):
        engine.load_adapter(1, replacement)
    _assert_cuda_chooses_as_the_cpu(cuda, cpu, prompts, adapters=[1, 2, 1])


@pytest.mark.gpu
def test_kv_cache_lives_on_the_cuda_device(engines: tuple[Engine, Engine]) -> None:
    cuda, _ = engines
    assert cuda.execution_provider == "CUDAExecutionProvider"
    cache = cuda.cache
    engine_greedy_rows(cuda, [random_prompt(9, seed=4), random_prompt(4, seed=5)], 3)
    cuda.move_slot(1, 0, 4 + 2)  # on a GPU a slot moves with kv_copy.onnx, on the device
    # The buffers bound to every pass are OrtValues in device memory, the ones allocated at start-up.
    assert {value.device_name() for value in cache._values} == {"cuda"}
    assert [value.data_ptr() for value in cache._values] == cache._pointers


@pytest.mark.gpu
def test_fp32_on_cuda_warns_that_attention_runs_on_the_cpu(
    model_dirs: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    _skip_without_cuda(next(iter(model_dirs.values())))
    with caplog.at_level("WARNING", logger="textgen_server.engine"):
        for model_dir in model_dirs.values():
            Engine(model_dir, provider="cuda", slots=1, max_len=64)
    warned = [r.getMessage() for r in caplog.records if "GroupQueryAttention" in r.getMessage()]
    assert len(warned) == sum(ModelConfig.load(d).dtype == "fp32" for d in model_dirs.values()), warned


def test_engine_refuses_cuda_it_cannot_start(model_dirs: dict[str, Path]) -> None:
    model_dir = next(iter(model_dirs.values()))
    if _cuda_missing(model_dir) is None:
        pytest.skip("CUDA starts here; the server test checks the refusal with every GPU hidden")
    with pytest.raises(ProviderError, match="--provider cuda"):
        Engine(model_dir, provider="cuda")


def test_server_refuses_cuda_it_cannot_start(model_dirs: dict[str, Path]) -> None:
    assert_server_refuses_cuda(sys.executable, next(iter(model_dirs.values())))
