"""This project's engine: one prefill, then one-token decode steps, greedy, in process."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from textgen_server.engine import Engine


class EnginePeer:
    def __init__(self, model_dir: str, threads: int, provider: str = "cpu") -> None:
        self.engine = Engine(Path(model_dir), provider=provider, threads=threads, slots=1)

    def info(self) -> dict[str, Any]:
        return {
            "onnxruntime": ort.__version__,
            "provider": self.engine.execution_provider,
            "threads": self.engine.threads,
        }

    def generate(self, prompt_ids: list[int], new_tokens: int) -> list[float]:
        """Timestamps `[start, token_1, ..., token_n]`; exactly n tokens (EOS is not a stop here)."""
        start = time.perf_counter()
        token = int(self.engine.prefill(0, prompt_ids).argmax())  # logits [vocab]
        times = [start, time.perf_counter()]
        length = len(prompt_ids)
        for _ in range(new_tokens - 1):
            # Without a copy, as the server's scheduler reads them.
            step = np.array([token], dtype=np.int64)
            logits = self.engine.decode(step, np.array([length]), copy=False)  # [1, vocab]
            token = int(logits[0].argmax())
            length += 1
            times.append(time.perf_counter())
        return times
