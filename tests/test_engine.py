"""The ONNX engine against transformers on the same weights, and its KV cache allocated once."""

from __future__ import annotations

import resource
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from greedy import engine_greedy, prefill_in_chunks, random_prompt, transformers_greedy
from textgen_server import kv_cache
from textgen_server.engine import Engine
from textgen_server.model_config import ModelConfig
from transformers import MistralForCausalLM

NEW_TOKENS = 64


@pytest.fixture(scope="module", params=["numpy-cache", "ortvalue-cache"])
def engine(request: pytest.FixtureRequest, tiny_model_dir: Path) -> Engine:
    """Both KV stores: numpy arrays (the CPU default) and OrtValues moved by kv_copy.onnx (the GPU's)."""
    return Engine(tiny_model_dir, provider="cpu", slots=4, host_arrays=request.param == "numpy-cache")


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> MistralForCausalLM:
    return MistralForCausalLM.from_pretrained(tiny_model_dir / "checkpoint", dtype=torch.float32).eval()


@pytest.mark.parametrize("length", [1, 2, 17, 300, 1100, 3000])
def test_greedy_parity_with_transformers(engine: Engine, reference: MistralForCausalLM, length: int) -> None:
    prompt = random_prompt(length, seed=length)
    expected = transformers_greedy(reference, prompt, NEW_TOKENS)
    assert engine_greedy(engine, prompt, NEW_TOKENS) == expected
    if length > 256:  # the same prompt prefilled in chunks, as the scheduler does for long prompts
        assert engine_greedy(engine, prompt, NEW_TOKENS, chunk=256) == expected


def test_rows_joining_and_leaving_at_different_positions_stay_exact(
    engine: Engine, reference: MistralForCausalLM
) -> None:
    """Slots as the scheduler uses them: A runs alone, B joins (prefilled in chunks), C joins, A leaves
    and C's cache moves into A's slot, then B and C go on together; each equals transformers alone."""
    prompts = {"A": random_prompt(30, seed=1), "B": random_prompt(70, seed=2), "C": random_prompt(5, seed=3)}
    expected = {name: transformers_greedy(reference, p, 24) for name, p in prompts.items()}
    got: dict[str, list[int]] = {}
    length: dict[str, int] = {}
    rows: list[str] = []  # rows[i] owns slot i

    def join(name: str, chunk: int) -> None:
        got[name] = [int(prefill_in_chunks(engine, len(rows), prompts[name], chunk).argmax())]
        length[name] = len(prompts[name])
        rows.append(name)

    def decode(steps: int) -> None:
        for _ in range(steps):
            tokens = np.array([got[n][-1] for n in rows])
            logits = engine.decode(tokens, np.array([length[n] for n in rows]))  # [rows, vocab]
            for row, name in enumerate(rows):
                got[name].append(int(logits[row].argmax()))
                length[name] += 1

    join("A", chunk=1000)
    decode(5)
    join("B", chunk=16)
    decode(4)
    join("C", chunk=1000)
    decode(9)  # A has 19 tokens now
    engine.move_slot(2, 0, length["C"])  # A leaves: the last row (C) takes its slot
    rows = ["C", "B"]
    decode(24 - len(got["B"]))
    assert (len(got["A"]), len(got["B"]), len(got["C"])) == (19, 24, 20)
    assert got["A"] == expected["A"][:19]
    assert got["B"] == expected["B"]
    assert got["C"] == expected["C"][:20]


@pytest.mark.parametrize("copy_threads", [1, 2, 3])
def test_a_host_slot_move_copies_the_positions_in_use_whatever_the_copy_threads(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, copy_threads: int
) -> None:
    """Split over threads (every move here: the threshold is 0), a move copies exactly what one thread
    does: the first `length` positions of every buffer, and nothing of any other slot."""
    monkeypatch.setattr(kv_cache, "PARALLEL_COPY_BYTES", 0)
    config = ModelConfig.load(tiny_model_dir)
    cache = kv_cache.KVCache(
        tiny_model_dir,
        config,
        slots=3,
        max_len=64,
        device="cpu",
        providers=["CPUExecutionProvider"],
        copy_threads=copy_threads,
    )
    rng = np.random.default_rng(copy_threads)
    for array in cache._arrays:
        array[...] = rng.standard_normal(array.shape)
    before = [array.copy() for array in cache._arrays]  # [slots, kv_heads, max_len, head_dim] each
    cache.move(2, 0, 40)
    for was, now in zip(before, cache._arrays, strict=True):
        expected = was.copy()
        expected[0, :, :40] = was[2, :, :40]
        np.testing.assert_array_equal(now, expected)


def test_kv_cache_stays_put_and_never_passes_through_numpy(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine(tiny_model_dir, provider="cpu", slots=2, host_arrays=False)
    pointers = list(engine.cache._pointers)
    numpy_reads: list[tuple[int, ...]] = []
    real_numpy = ort.OrtValue.numpy

    def tracking_numpy(value: ort.OrtValue) -> np.ndarray:
        numpy_reads.append(tuple(value.shape()))
        return real_numpy(value)

    monkeypatch.setattr(ort.OrtValue, "numpy", tracking_numpy)
    token = int(engine.prefill(1, random_prompt(8, seed=3)).argmax())
    engine.move_slot(1, 0, 8)
    for step in range(3):
        token = int(engine.decode(np.array([token]), np.array([8 + step]))[0].argmax())
    # Only the prefill's logits ([rows, 1, vocab]) were read into numpy (decode passes write theirs into
    # the engine's bound host buffer), never a KV buffer, and the buffers are the ones allocated at
    # start-up.
    assert numpy_reads == [(1, 1, 32000)]
    assert engine.cache._pointers == pointers


@pytest.mark.parametrize("with_adapters", [False, True], ids=["plain", "adapter-slots"])
def test_decode_bindings_reused_across_row_counts_match_passes_bound_alone(
    tiny_model_dir: Path, lora_model_dir: Path, with_adapters: bool
) -> None:
    """Decode reuses one binding per row count and overwrites its inputs in place; every pass must
    still see its own tokens, lengths and adapters. Each row is checked against the same token at the
    same position through prefill, which binds each pass alone, on a second engine; and logits a
    caller keeps are never overwritten by later passes."""
    from random_adapters import random_adapter

    model_dir = lora_model_dir if with_adapters else tiny_model_dir
    engines = [Engine(model_dir, provider="cpu", slots=3, max_len=64) for _ in range(2)]
    batched, alone = engines
    if with_adapters:
        for engine in engines:
            for slot in (1, 2):
                engine.load_adapter(slot, random_adapter(engine.config, rank=8, seed=slot))
    prompts = [[1, 5, 9], [1, 7], [1, 3, 3, 8]]
    for engine in engines:
        for slot, prompt in enumerate(prompts):
            engine.prefill(slot, prompt)
    lengths = [len(p) for p in prompts]
    # Row counts change back and forth (each count's binding is reused), and so do the adapters.
    plan = [(3, [0, 1, 2]), (1, [2]), (2, [1, 0]), (3, [0, 0, 0]), (2, [2, 2]), (1, [0]), (3, [1, 0, 2])]
    kept = []
    for step, (rows, row_adapters) in enumerate(plan):
        tokens = np.array([10 + 7 * step + row for row in range(rows)], dtype=np.int64)
        adapters = np.array(row_adapters if with_adapters else [0] * rows, dtype=np.int64)
        got = batched.decode(tokens, np.array(lengths[:rows], dtype=np.int64), adapters)  # [rows, vocab]
        kept.append((got, got.copy()))
        for row in range(rows):
            expected = alone.prefill(row, [int(tokens[row])], start=lengths[row], adapter=int(adapters[row]))
            np.testing.assert_allclose(
                got[row], expected, rtol=1e-4, atol=1e-4, err_msg=f"step {step} row {row}"
            )
            assert int(got[row].argmax()) == int(expected.argmax())
            lengths[row] += 1
    for got, copy in kept:
        np.testing.assert_array_equal(got, copy)


def test_decode_without_copy_gives_the_same_logits_read_only_until_the_next_pass(
    tiny_model_dir: Path,
) -> None:
    """`copy=False` (what the scheduler asks for) is a view of the pass's output buffer: equal to the
    copy, not writable, and overwritten by the next pass."""
    engine = Engine(tiny_model_dir, provider="cpu", slots=2, max_len=64)
    for slot, prompt in enumerate([[1, 5, 9], [1, 7]]):
        engine.prefill(slot, prompt)
    tokens, lengths = np.array([11, 12]), np.array([3, 2])
    copied = engine.decode(tokens, lengths)  # [2, vocab]
    for slot, prompt in enumerate([[1, 5, 9], [1, 7]]):
        engine.prefill(slot, prompt)  # the same positions again
    view = engine.decode(tokens, lengths, copy=False)  # [2, vocab]
    np.testing.assert_array_equal(view, copied)
    assert not view.flags.writeable
    with pytest.raises(ValueError):
        view[0, 0] = 0.0
    engine.decode(np.array([13, 14]), lengths + 1)
    assert not np.array_equal(view, copied)


def test_decode_slots_decodes_part_of_the_batch_like_the_batch_pass(tiny_model_dir: Path) -> None:
    """After a batch's pass failed, the scheduler decodes its rows in parts over their own slots: each
    part's logits are the batch pass's rows', and the part writes only its slots (the other rows'
    next pass is unchanged)."""
    engines = [Engine(tiny_model_dir, provider="cpu", slots=4, max_len=64) for _ in range(2)]
    batched, parted = engines
    prompts = [[1, 5, 9], [1, 7], [1, 3, 3, 8], [1, 4]]
    for engine in engines:
        for slot, prompt in enumerate(prompts):
            engine.prefill(slot, prompt)
    lengths = np.array([len(p) for p in prompts], dtype=np.int64)  # [4]
    for step in range(3):
        tokens = np.array([20 + step, 30 + step, 40 + step, 50 + step], dtype=np.int64)  # [4]
        expected = batched.decode(tokens, lengths)  # [4, vocab]
        halves = [
            parted.decode_slots(
                first, tokens[first : first + 2], lengths[first : first + 2], np.zeros(2, np.int64)
            )
            for first in (2, 0)  # the second half first: neither may touch the other's slots
        ]
        np.testing.assert_allclose(np.concatenate(halves[::-1]), expected, rtol=1e-4, atol=1e-4)
        lengths += 1
    with pytest.raises(ValueError, match="outside this cache"):
        parted.decode_slots(3, tokens[:2], lengths[:2], np.zeros(2, np.int64))


def test_memory_does_not_grow_over_a_thousand_joins_and_leaves(tiny_model_dir: Path) -> None:
    engine = Engine(tiny_model_dir, provider="cpu", slots=4, host_arrays=False)
    prompts = [random_prompt(n, seed=n) for n in (3, 9, 40)]

    def churn(rounds: int) -> None:
        for i in range(rounds):
            slot = i % 3
            engine.prefill(slot + 1, prompts[slot])  # a request joins in a free slot
            engine.decode(np.array([5, 6]), np.array([7, 8]))
            engine.move_slot(slot + 1, 0, len(prompts[slot]))  # another leaves; the joiner takes its slot

    churn(200)  # warm-up: ORT's arenas reach their working size
    rss_warm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    churn(1000)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_warm
    assert grown_kib < 8 * 1024, f"peak RSS grew by {grown_kib} KiB over 1000 joins and leaves"
    assert engine.cache.nbytes == 4 * 2 * 2 * 2 * engine.max_len * 16 * 4  # slots x layers x (k, v) x ...


def test_prefill_rejects_empty_prompt_and_positions_past_the_slot(engine: Engine) -> None:
    with pytest.raises(ValueError, match="at least one token"):
        engine.prefill(0, [])
    with pytest.raises(ValueError, match="outside this cache"):
        engine.prefill(0, [1, 2], start=engine.max_len - 1)


def test_incomplete_or_older_model_directory_says_how_to_fix_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    for name in ("textgen.json", "model.onnx", "tokenizer.json"):
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="kv_copy.onnx missing.*export it again"):
        Engine(tmp_path, provider="cpu")
    (tmp_path / "kv_copy.onnx").write_bytes((tiny_model_dir / "kv_copy.onnx").read_bytes())
    config = ModelConfig.load(tmp_path)
    # Format 2 differs from 3 only in how a graph with adapter slots packs gate and up: a plain graph
    # of either is the same graph, and the engine reads both.
    format_2 = config.to_json().replace('"format_version": 3', '"format_version": 2')
    (tmp_path / "textgen.json").write_text(format_2, encoding="utf-8")
    assert Engine(tmp_path, provider="cpu", slots=1, max_len=64).config.format_version == 2
    older = config.to_json().replace('"format_version": 3', '"format_version": 1')
    (tmp_path / "textgen.json").write_text(older, encoding="utf-8")
    with pytest.raises(
        FileNotFoundError, match="format 1; this server reads formats 2 to 3.*export it again"
    ):
        Engine(tmp_path, provider="cpu")
