"""onnxruntime-genai's `Generator` loop on a model its builder made from the same checkpoint (fp32, cpu).

Runs from bench/.venv-genai (its builder needs a newer transformers than ours). `append_tokens` runs the
prefill; each `generate_next_token` picks a token from the logits in hand and, from the second call on,
first runs the forward pass for the previous token: call k returns with token k chosen.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime_genai as og  # type: ignore[import-not-found, unused-ignore]  # in bench/.venv-genai

CONFIG = "genai_config.json"


def pin_threads(model_dir: Path, threads: int) -> None:
    """genai reads session options from its config file only: write the thread counts there."""
    path = model_dir / CONFIG
    config = json.loads(path.read_text(encoding="utf-8"))
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"] = threads
    options["inter_op_num_threads"] = 1
    path.write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")


class GenaiPeer:
    def __init__(self, model_dir: str, threads: int) -> None:
        self.threads = threads
        pin_threads(Path(model_dir), threads)
        self.model = og.Model(model_dir)

    def info(self) -> dict[str, Any]:
        from importlib import metadata

        import onnxruntime

        return {
            "onnxruntime_genai": og.__version__,
            "onnxruntime": onnxruntime.__version__,
            "builder_transformers": metadata.version("transformers"),
            "threads": self.threads,
        }

    def generate(self, prompt_ids: list[int], new_tokens: int) -> list[float]:
        """Timestamps `[start, token_1, ..., token_n]`; min_length = max_length forces exactly n tokens.

        The clock starts once the generator is set up: its KV buffer, allocated here for this run, is
        no part of the time to first token, as this engine's, allocated at start-up, is not."""
        total = len(prompt_ids) + new_tokens
        params = og.GeneratorParams(self.model)
        # max_length sizes the shared past/present buffer: the cache is allocated once, for this run.
        params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=1)
        generator = og.Generator(self.model, params)
        start = time.perf_counter()
        generator.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
        times = [start]
        for _ in range(new_tokens):
            generator.generate_next_token()
            times.append(time.perf_counter())
        generated = len(generator.get_sequence(0)) - len(prompt_ids)
        if generated != new_tokens:
            raise RuntimeError(f"genai generated {generated} tokens, expected {new_tokens}")
        return times

    def generate_batch(self, prompts: list[list[int]], new_tokens: int) -> list[float]:
        """Equal-length prompts as one static batch (genai has no continuous batching): timestamps
        `[start, step_1, ..., step_n]`, each step giving every row its next token."""
        rows, length = len(prompts), len(prompts[0])
        if any(len(p) != length for p in prompts):
            raise ValueError("a genai batch needs prompts of one length")
        total = length + new_tokens
        start = time.perf_counter()
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=rows)
        generator = og.Generator(self.model, params)
        generator.append_tokens(np.asarray(prompts, dtype=np.int32))  # [rows, length]
        times = [start]
        for _ in range(new_tokens):
            generator.generate_next_token()
            times.append(time.perf_counter())
        generated = [len(generator.get_sequence(row)) - length for row in range(rows)]
        if generated != [new_tokens] * rows:
            raise RuntimeError(f"genai generated {generated} tokens per row, expected {new_tokens}")
        return times
