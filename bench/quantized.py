"""Quantized weights side by side (issue 10): this engine's int4 and int8 exports of the bench checkpoint
against its fp32, onnxruntime-genai's int4 (its builder's `-p int4`) and llama.cpp's Q4_0 and Q8_0, in
the batch-1 cases of the same run, and at `quantized_streams` sequences decoded together.
"""

from __future__ import annotations

from typing import Any

from .cells import spread_cell, times
from .stats import distribution, ratio

# The batch-1 peers whose weights are not the checkpoint's fp32: no roofline share from fp32 bytes.
QUANTIZED_PEERS = (
    "engine-int4",
    "engine-int4-head4",
    "engine-int8",
    "genai-int4",
    "llamacpp-q8_0",
    "llamacpp-q4_0",
)
COLUMNS = {
    "engine": "engine fp32",
    "engine-int8": "engine int8",
    "engine-int4": "engine int4",
    "engine-int4-head4": "engine int4, 4-bit head",
    "genai-int4": "genai int4",
    "llamacpp-q8_0": "llama.cpp Q8_0",
    "llamacpp-q4_0": "llama.cpp Q4_0",
}
# numerator, denominator, label: the comparisons issue 10 sets targets on, int8's counterpart, and
# int4 beside genai's int4 with the same 4-bit LM head.
RATIOS = (
    ("engine-int4", "llamacpp-q4_0", "int4 ÷ Q4_0"),
    ("engine-int4", "genai-int4", "int4 ÷ genai int4"),
    ("engine-int4-head4", "genai-int4", "int4 4-bit head ÷ genai int4"),
    ("engine-int4", "engine", "int4 ÷ fp32"),
    ("engine-int8", "llamacpp-q8_0", "int8 ÷ Q8_0"),
)
TARGETS = {"int4 ÷ Q4_0": 1.0, "int4 ÷ genai int4": 1.0, "int4 ÷ fp32": 3.0}
# The servers through gRPC, as the columns they fill at `quantized_streams` streams.
SERVER_COLUMNS = {
    "grpc": "engine",
    "grpc-int8": "engine-int8",
    "grpc-int4": "engine-int4",
    "grpc-int4-head4": "engine-int4-head4",
}


def summarize(
    batch1: dict[str, Any],
    dtype_streams: dict[str, Any],
    parallel_rates: dict[str, list[float]],
    streams: int,
) -> dict[str, Any]:
    """Per measure (each batch-1 case's decode, and the aggregate decode at `streams` sequences):
    every column's tok/s and the RATIOS. `dtype_streams`: the servers' stream levels, summarized;
    `parallel_rates`: the peers' aggregate rates per repetition."""
    measures: dict[str, dict[str, Any]] = {
        key: {
            peer: case["peers"][peer]["decode_tok_s"]
            for peer in COLUMNS
            if "decode_tok_s" in case["peers"].get(peer, {})
        }
        for key, case in batch1.items()
    }
    aggregate = {
        SERVER_COLUMNS[server]: level["aggregate_decode_tok_s"]
        for server, level in dtype_streams.items()
        if server in SERVER_COLUMNS
    }
    aggregate.update({peer: distribution(rates) for peer, rates in parallel_rates.items() if rates})
    if aggregate:
        measures[f"{streams} streams"] = aggregate
    return {
        "streams": streams,
        "tok_s": measures,
        "ratios": {
            key: {label: ratio(_median(values, num), _median(values, den)) for num, den, label in RATIOS}
            for key, values in measures.items()
        },
    }


def target_values(quantized: dict[str, Any]) -> dict[str, float | None]:
    """The first batch-1 case's ratios (prompt 128): what issue 10's targets are held to."""
    first: dict[str, float | None] = next(iter(quantized.get("ratios", {}).values()), {})
    return {f"engine {label} decode": first.get(label) for label in TARGETS}


def markdown_lines(quantized: dict[str, Any], batch1: dict[str, Any]) -> list[str]:
    if not any(p in values for values in quantized["tok_s"].values() for p in ("engine-int4", "engine-int8")):
        return []
    labels = [label for _, _, label in RATIOS]
    lines = [
        "",
        (
            "Quantized weights, same run: this engine's `--dtype int4` and `int8` exports of the bench "
            "checkpoint (MatMulNBits, block 32, accuracy_level 4, LM head int8) and `--dtype int4 "
            "--lm-head int4` (the 4-bit LM head genai's int4 has too), onnxruntime-genai's "
            "`-p int4` build of it, and llama.cpp's Q8_0 and Q4_0 of it; decode tok/s, median (min–max). "
            f"At {quantized['streams']} streams: this engine through its gRPC server (prompt 128, 128 new "
            "tokens each), genai as one static batch of as many prompts, llama.cpp's "
            "`llama-batched-bench -npp 128 -ntg 128 -npl N` (its `speed_tg`); all aggregate decode rates, "
            "prefill excluded (for this engine, the prefill before any stream was decoded):"
        ),
        "",
        f"| measure | {' | '.join(COLUMNS.values())} | {' | '.join(labels)} |",
        "|---|" + "---|" * (len(COLUMNS) + len(labels)),
    ]
    for key, values in quantized["tok_s"].items():
        prompt, _, new = key.partition("/")  # a batch-1 case "128/128", or "16 streams"
        label = f"decode tok/s, prompt {prompt}, {new} new" if new else f"aggregate decode tok/s, {key}"
        cells = [spread_cell(values.get(peer)) for peer in COLUMNS]
        ratios = [times(quantized["ratios"][key].get(label_)) for label_ in labels]
        lines.append(f"| {label} | {' | '.join(cells + ratios)} |")
    return lines


def _median(values: dict[str, Any], peer: str) -> float | None:
    value = values.get(peer)
    return None if value is None else float(value["median"])
