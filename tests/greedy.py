"""Greedy decoding on both sides of the parity tests: the engine's offline loop and transformers'.

Shared by tests/test_engine.py, tests/test_gpu.py and tests/ort_gpu_probe.py, which runs the engine
in the onnxruntime-gpu virtualenv where there is no torch: torch is imported by the transformers
side only, when it is called.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from textgen_server.engine import Engine
    from transformers import MistralForCausalLM


def random_prompt(length: int, seed: int) -> list[int]:
    """BOS then `length - 1` random token ids of Mistral's vocabulary (no special tokens)."""
    rng = np.random.default_rng(seed)
    return [1, *rng.integers(3, 32000, length - 1).tolist()]


def prefill_in_chunks(
    engine: Engine, slot: int, prompt: list[int], chunk: int, adapter: int = 0
) -> npt.NDArray[np.float32]:
    """The prompt into `slot` in chunks of `chunk` tokens (through adapter slot `adapter`); the last
    chunk's logits [vocab]."""
    for start in range(0, len(prompt), chunk):
        logits = engine.prefill(slot, prompt[start : start + chunk], start=start, adapter=adapter)
    return logits


def engine_greedy(engine: Engine, prompt: list[int], new_tokens: int, chunk: int = 10_000) -> list[int]:
    """`new_tokens` argmax tokens for one prompt, alone in slot 0."""
    return engine_greedy_rows(engine, [prompt], new_tokens, chunk)[0]


def engine_greedy_rows(
    engine: Engine,
    prompts: Sequence[list[int]],
    new_tokens: int,
    chunk: int = 10_000,
    adapters: Sequence[int] | None = None,
) -> list[list[int]]:
    """`new_tokens` argmax tokens for each prompt: prompt i prefilled into slot i, then all rows
    decoded together, each at its own position (row i through adapter slot adapters[i], default 0)."""
    row_adapters = np.array(
        adapters if adapters is not None else [0] * len(prompts), dtype=np.int64
    )  # [rows]
    generated = [
        [int(prefill_in_chunks(engine, slot, p, chunk, int(row_adapters[slot])).argmax())]
        for slot, p in enumerate(prompts)
    ]
    lengths = np.array([len(p) for p in prompts], dtype=np.int64)  # [rows]
    for _ in range(new_tokens - 1):
        logits = engine.decode(
            np.array([row[-1] for row in generated], dtype=np.int64), lengths, row_adapters
        )
        for row, row_logits in zip(generated, logits, strict=True):  # [rows, vocab]
            row.append(int(row_logits.argmax()))
        lengths += 1
    return generated


def engine_forced_logits(
    engine: Engine,
    prompts: Sequence[list[int]],
    tokens: Sequence[Sequence[int]],
    adapters: Sequence[int] | None = None,
    chunk: int = 10_000,
) -> npt.NDArray[np.float32]:
    """The logits before each of `tokens` when the engine is fed those tokens (teacher forcing),
    row i through adapter slot adapters[i] (default 0, the base model), each prompt prefilled in
    chunks of `chunk` tokens.

    Returns [steps, rows, vocab]: step 0 is the prefills', step i follows tokens[row][:i].
    """
    row_adapters = np.array(
        adapters if adapters is not None else [0] * len(prompts), dtype=np.int64
    )  # [rows]
    steps = [
        np.stack(
            [
                prefill_in_chunks(engine, slot, p, chunk, int(row_adapters[slot]))
                for slot, p in enumerate(prompts)
            ]
        )
    ]  # [rows, vocab]
    lengths = np.array([len(p) for p in prompts], dtype=np.int64)  # [rows]
    for step in range(len(tokens[0]) - 1):
        fed = np.array([row[step] for row in tokens], dtype=np.int64)  # [rows]
        steps.append(engine.decode(fed, lengths, row_adapters))
        lengths += 1
    return np.stack(steps)


def transformers_greedy(model: MistralForCausalLM, prompt: list[int], new_tokens: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return list(out[0, len(prompt) :].tolist())
