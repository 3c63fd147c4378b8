"""What one run measures: the full `make bench` set, or a quick smoke run with few, short repetitions."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

GIB = 1 << 30


@dataclass(frozen=True)
class Case:
    """Batch-1 generations of one prompt length, repeated with the peers interleaved."""

    prompt_tokens: int
    new_tokens: int
    reps: int


@dataclass(frozen=True)
class BenchConfig:
    threads: int = 2
    cases: tuple[Case, ...] = (Case(128, 128, 7), Case(2048, 128, 3))
    concurrency: tuple[int, ...] = (1, 4, 16, 32)
    sweep_prompt_tokens: int = 128
    sweep_new_tokens: int = 128
    sweep_reps: int = 5
    # Constrained decoding: the same streams with a JSON schema on every row and without (issue 12).
    grammar_concurrency: tuple[int, ...] = (1, 16)
    grammar_new_tokens: int = 128
    grammar_reps: int = 5
    bandwidth_bytes: int = GIB
    bandwidth_reps: int = 5
    seed: int = 20240216
    # "llamacpp" stands for its three GGUF variants (f32, Q8_0, Q4_0), measured by llama-bench.
    peers: tuple[str, ...] = field(default=("engine", "transformers", "genai", "llamacpp"))
    # OMP_WAIT_POLICY for llama-bench, or "default" to leave it unset (see bench/peers/llamacpp_peer.py).
    llamacpp_omp_wait: str = "passive"
    # LoRA (bench/lora.py): the sweep's prompt and length at this many streams, all base vs mixed.
    lora_streams: int = 16
    lora_reps: int = 3
    only_lora: bool = False  # python -m bench --only-lora: that section alone

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FULL = BenchConfig()
QUICK = BenchConfig(
    cases=(Case(128, 16, 2), Case(2048, 4, 1)),
    sweep_new_tokens=16,
    sweep_reps=1,
    grammar_new_tokens=16,
    grammar_reps=1,
    bandwidth_bytes=GIB // 4,
    bandwidth_reps=2,
    lora_reps=1,
)
