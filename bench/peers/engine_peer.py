"""This project's engine: the prompt's prefill passes, then one-token decode steps, greedy, in process."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from textgen_server.engine import Engine
from textgen_server.scheduler import SchedulerLimits


class EnginePeer:
    def __init__(self, model_dir: str, threads: int, provider: str = "cpu") -> None:
        self.engine = Engine(Path(model_dir), provider=provider, threads=threads, slots=1)
        # The prompt goes in the passes the server's scheduler cuts it into with its default limits.
        # An older tree of this engine (bench.pair --other-source) has no such limit: its server
        # prefilled an idle step's prompt in one pass.
        largest_pass = getattr(SchedulerLimits(), "largest_prefill_pass", None)
        self.pass_tokens = largest_pass(self.engine.device) if largest_pass else None

    def info(self) -> dict[str, Any]:
        return {
            "onnxruntime": ort.__version__,
            "provider": self.engine.execution_provider,
            "threads": self.engine.threads,
        }

    def generate(self, prompt_ids: list[int], new_tokens: int) -> list[float]:
        """Timestamps `[start, token_1, ..., token_n]`; exactly n tokens (EOS is not a stop here)."""
        start = time.perf_counter()
        size = self.pass_tokens or len(prompt_ids)
        for begin in range(0, len(prompt_ids), size):
            logits = self.engine.prefill(0, prompt_ids[begin : begin + size], start=begin)  # [vocab]
        token = int(logits.argmax())
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
