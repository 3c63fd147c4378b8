"""transformers `generate` on the same checkpoint (fp32, eager PyTorch on CPU), greedy, fixed length.

Token times come from a streamer: `generate` calls `put` once with the prompt, then once per generated
token, so TTFT and the decode-only rate come from the same call. The start is taken before `generate`
itself: its setup is part of what a caller waits for.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer


class _TokenClock(BaseStreamer):
    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class TransformersPeer:
    def __init__(self, model_dir: str, threads: int) -> None:
        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)
        checkpoint = Path(model_dir) / "checkpoint"
        self.model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        self.model.eval()  # type: ignore[no-untyped-call]  # no dropout

    def info(self) -> dict[str, Any]:
        return {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "attention": self.model.config._attn_implementation,
        }

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], new_tokens: int) -> list[float]:
        """Timestamps `[start, token_1, ..., token_n]`; min_new_tokens masks EOS so exactly n come out."""
        input_ids = torch.tensor([prompt_ids], dtype=torch.long)
        clock = _TokenClock()
        start = time.perf_counter()
        self.model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            streamer=clock,
            pad_token_id=self.model.config.eos_token_id,
        )
        token_times = clock.times[1:]  # the first put() is the prompt
        if len(token_times) != new_tokens:
            raise RuntimeError(f"streamer saw {len(token_times)} tokens, expected {new_tokens}")
        return [start, *token_times]
