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
    # Quantized weights (issue 10): models/bench-int4, -int8 and -int4-head4 (bench/variants.py) in the
    # batch-1 cases, and through gRPC at this many streams beside fp32.
    quantized: tuple[str, ...] = ("int4", "int8", "int4-head4")
    quantized_streams: int = 16
    quantized_reps: int = 3
    # Mixed prompt lengths (issue 9): this many requests of 1 to mixed_max_words words, all at once vs
    # one after another, on today's engine and the one before v2.
    mixed_requests: int = 16
    mixed_max_words: int = 300
    mixed_new_tokens: int = 64
    mixed_reps: int = 3
    # Long-prompt arrivals (issue 9): inter-token gaps of this many running streams while prompts of
    # arrival_prompt_tokens keep arriving, one after another.
    arrival_streams: int = 8
    arrival_new_tokens: int = 128
    arrival_prompt_tokens: int = 3000
    arrival_reps: int = 3
    bandwidth_bytes: int = GIB
    bandwidth_reps: int = 5
    seed: int = 20240216
    # "llamacpp" stands for its three GGUF variants (f32, Q8_0, Q4_0), measured by llama-bench; "before"
    # for the engine before v2 (bench/variants.py) through gRPC.
    peers: tuple[str, ...] = field(default=("engine", "transformers", "genai", "llamacpp", "before"))
    # OMP_WAIT_POLICY for llama-bench: "passive", "default" (unset), or "auto": the faster of the two
    # in a probe at the start of the run (see bench/peers/llamacpp_peer.py).
    llamacpp_omp_wait: str = "auto"
    # LoRA (bench/lora.py): the sweep's prompt and length at this many streams, all base vs mixed.
    lora_streams: int = 16
    lora_reps: int = 5
    # The memory roofline beyond the LLC (bench/beyond_llc.py), where the bench model's weights sit in
    # it: batch-1 decode of a model with Mistral-7B's widths, LLC_MULTIPLE times the LLC, this many rounds.
    beyond_llc_rounds: int = 8
    beyond_llc_new_tokens: int = 32
    only: str | None = None  # python -m bench --only lora|constrained: that section alone

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FULL = BenchConfig()
QUICK = BenchConfig(
    cases=(Case(128, 16, 2), Case(2048, 4, 1)),
    sweep_new_tokens=16,
    sweep_reps=1,
    grammar_new_tokens=16,
    grammar_reps=1,
    quantized_reps=1,
    mixed_requests=4,
    mixed_max_words=40,
    mixed_new_tokens=8,
    mixed_reps=1,
    arrival_new_tokens=16,
    arrival_prompt_tokens=600,
    arrival_reps=1,
    bandwidth_bytes=GIB // 4,
    bandwidth_reps=2,
    lora_reps=1,
    beyond_llc_rounds=0,  # its model is gigabytes: not for a smoke run
)
