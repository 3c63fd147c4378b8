"""The ONNX engine against transformers on the same weights, and its KV cache staying on the device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from textgen_server.engine import Engine
from transformers import MistralForCausalLM

NEW_TOKENS = 64


@pytest.fixture(scope="module", params=["native", "optimum"])
def engine(request: pytest.FixtureRequest, tiny_model_dir: Path) -> Engine:
    """Both graphs the exporter writes, on the same weights (the demo's fixed seed)."""
    model_dir = tiny_model_dir if request.param == "native" else request.getfixturevalue("tiny_optimum_dir")
    return Engine(model_dir, provider="cpu")


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> MistralForCausalLM:
    return MistralForCausalLM.from_pretrained(tiny_model_dir / "checkpoint", dtype=torch.float32).eval()


def _prompt(length: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [1, *rng.integers(3, 32000, length - 1).tolist()]


def _transformers_greedy(model: MistralForCausalLM, prompt: list[int], new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def _engine_greedy(engine: Engine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    batch, logits = engine.prefill(prompts)  # logits [batch, vocab]
    generated: list[list[int]] = [[] for _ in prompts]
    for step in range(new_tokens):
        tokens = logits.argmax(axis=-1).astype(np.int64)  # [batch]
        for row, token in enumerate(tokens):
            generated[row].append(int(token))
        if step + 1 < new_tokens:
            logits = engine.decode(batch, tokens)
    return generated


@pytest.mark.parametrize("length", [1, 2, 17, 300, 1100, 3000])
def test_greedy_parity_with_transformers(engine: Engine, reference: MistralForCausalLM, length: int) -> None:
    prompt = _prompt(length, seed=length)
    assert _engine_greedy(engine, [prompt], NEW_TOKENS)[0] == _transformers_greedy(
        reference, prompt, NEW_TOKENS
    )


def test_left_padded_batch_equals_each_prompt_alone(engine: Engine) -> None:
    prompts = [_prompt(n, seed=n) for n in (3, 40, 11, 97)]
    alone = [_engine_greedy(engine, [p], 24)[0] for p in prompts]
    assert _engine_greedy(engine, prompts, 24) == alone


def test_concatenate_and_filter_keep_each_row_exact(engine: Engine) -> None:
    first, second = _prompt(30, seed=1), _prompt(5, seed=2)
    expected = [_engine_greedy(engine, [p], 12)[0] for p in (first, second)]
    a, la = engine.prefill([first])
    b, lb = engine.prefill([second])
    batch = engine.concatenate([a, b])
    tokens = np.array([la[0].argmax(), lb[0].argmax()], dtype=np.int64)
    got = [[int(tokens[0])], [int(tokens[1])]]
    for _ in range(5):
        logits = engine.decode(batch, tokens)
        tokens = logits.argmax(axis=-1).astype(np.int64)
        got[0].append(int(tokens[0]))
        got[1].append(int(tokens[1]))
    # The long row leaves; the short one goes on alone, with the all-padding columns trimmed.
    batch = engine.filter(batch, [1])
    assert batch.width == len(second) + 5
    tokens = tokens[[1]]
    for _ in range(6):
        logits = engine.decode(batch, tokens)
        tokens = logits.argmax(axis=-1).astype(np.int64)
        got[1].append(int(tokens[0]))
    assert got[0] == expected[0][:6]
    assert got[1] == expected[1]


def test_kv_cache_never_passes_through_numpy_between_steps(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch, logits = engine.prefill([_prompt(8, seed=3)])
    numpy_reads: list[tuple[int, ...]] = []
    real_numpy = ort.OrtValue.numpy

    def tracking_numpy(value: ort.OrtValue) -> np.ndarray:
        numpy_reads.append(tuple(value.shape()))
        return real_numpy(value)

    monkeypatch.setattr(ort.OrtValue, "numpy", tracking_numpy)
    tokens = logits.argmax(axis=-1).astype(np.int64)
    for _ in range(3):
        presents_before = [v.data_ptr() for v in batch.past]
        logits = engine.decode(batch, tokens)
        tokens = logits.argmax(axis=-1).astype(np.int64)
        # The new past is the OrtValues ORT allocated for this step's presents.
        assert all(isinstance(v, ort.OrtValue) for v in batch.past)
        assert [v.data_ptr() for v in batch.past] != presents_before
    # Only the logits ([batch, 1, vocab]) were read into numpy, never a KV tensor.
    assert numpy_reads == [(1, 1, 32000)] * 3


def test_prefill_rejects_empty_prompt(engine: Engine) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        engine.prefill([[]])


def test_joining_and_filtering_batches_stay_on_the_device(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, _ = engine.prefill([_prompt(9, seed=4)])
    second, _ = engine.prefill([_prompt(4, seed=5), _prompt(6, seed=6)])
    reads: list[tuple[int, ...]] = []
    real_numpy = ort.OrtValue.numpy

    def tracking_numpy(value: ort.OrtValue) -> np.ndarray:
        reads.append(tuple(value.shape()))
        return real_numpy(value)

    monkeypatch.setattr(ort.OrtValue, "numpy", tracking_numpy)
    joined = engine.concatenate([first, second])
    assert [v.shape() for v in joined.past[:1]] == [[3, 2, 9, 16]]  # [batch, kv_heads, width, head_dim]
    kept = engine.filter(joined, [2, 1])
    assert [v.shape() for v in kept.past[:1]] == [[2, 2, 6, 16]]  # the 3 all-padding columns are gone
    assert reads == []
    monkeypatch.undo()
    # Row 1 of the join is row 0 of `second` (width 6) behind 3 columns of zeros; filtering keeps it.
    joined_row = joined.past[0].numpy()[1]  # [kv_heads, width, head_dim]
    assert np.all(joined_row[:, :3] == 0) and np.array_equal(joined_row[:, 3:], second.past[0].numpy()[0])
    assert np.array_equal(kept.past[0].numpy()[1], second.past[0].numpy()[0])


def test_incomplete_model_directory_says_what_is_missing(tiny_model_dir: Path, tmp_path: Path) -> None:
    for name in ("textgen.json", "model.onnx", "tokenizer.json"):
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="kv_join.onnx, kv_select.onnx missing.*export it again"):
        Engine(tmp_path, provider="cpu")
