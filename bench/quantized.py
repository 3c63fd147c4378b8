"""Quantized weights side by side (issue 10): this engine's int4 and int8 exports of the bench checkpoint
against its fp32, onnxruntime-genai's int4 (its builder's `-p int4`) and llama.cpp's Q4_0 and Q8_0, in
the batch-1 cases of the same run; and through gRPC at `quantized_streams` streams, fp32 vs int8 vs int4.
"""

from __future__ import annotations

from typing import Any

from .stats import ratio

# The batch-1 peers whose weights are not the checkpoint's fp32: no roofline share from fp32 bytes.
QUANTIZED_PEERS = ("engine-int4", "engine-int8", "genai-int4", "llamacpp-q8_0", "llamacpp-q4_0")
COLUMNS = {
    "engine": "engine fp32",
    "engine-int8": "engine int8",
    "engine-int4": "engine int4",
    "genai-int4": "genai int4",
    "llamacpp-q8_0": "llama.cpp Q8_0",
    "llamacpp-q4_0": "llama.cpp Q4_0",
}
# numerator, denominator, label: the comparisons issue 10 sets targets on, and int8's counterpart.
RATIOS = (
    ("engine-int4", "llamacpp-q4_0", "int4 ÷ Q4_0"),
    ("engine-int4", "genai-int4", "int4 ÷ genai int4"),
    ("engine-int4", "engine", "int4 ÷ fp32"),
    ("engine-int8", "llamacpp-q8_0", "int8 ÷ Q8_0"),
)
TARGETS = {"int4 ÷ Q4_0": 1.0, "int4 ÷ genai int4": 1.0, "int4 ÷ fp32": 3.0}
SERVERS = {"grpc": "fp32", "grpc-int8": "int8", "grpc-int4": "int4"}


def summarize(batch1: dict[str, Any], dtype_streams: dict[str, Any], streams: int) -> dict[str, Any]:
    """Decode ratios per batch-1 case, and the servers' stream levels (already summarized)."""
    cases = {}
    for key, case in batch1.items():
        peers = case["peers"]
        cases[key] = {
            label: ratio(_decode(peers, numerator), _decode(peers, denominator))
            for numerator, denominator, label in RATIOS
        }
    fp32 = dtype_streams.get("grpc", {}).get("aggregate_decode_tok_s", {}).get("median")
    return {
        "ratios": cases,
        "streams": streams,
        "servers": dtype_streams,
        "aggregate_vs_fp32": {
            server: ratio(level["aggregate_decode_tok_s"]["median"], fp32)
            for server, level in dtype_streams.items()
        },
    }


def target_values(quantized: dict[str, Any]) -> dict[str, float | None]:
    """The first batch-1 case's ratios (prompt 128): what issue 10's targets are held to."""
    first: dict[str, float | None] = next(iter(quantized.get("ratios", {}).values()), {})
    return {f"engine {label} decode": first.get(label) for label in TARGETS}


def markdown_lines(quantized: dict[str, Any], batch1: dict[str, Any]) -> list[str]:
    if not any(p in case["peers"] for case in batch1.values() for p in ("engine-int4", "engine-int8")):
        return []
    labels = [label for _, _, label in RATIOS]
    lines = [
        "",
        (
            "Quantized weights, same run: this engine's `--dtype int4` and `int8` exports of the bench "
            "checkpoint (MatMulNBits, block 32, accuracy_level 4), onnxruntime-genai's `-p int4` build of it, "
            "and llama.cpp's Q8_0 and Q4_0 of it; batch-1 decode tok/s, median (min–max):"
        ),
        "",
        f"| measure | {' | '.join(COLUMNS.values())} | {' | '.join(labels)} |",
        "|---|" + "---|" * (len(COLUMNS) + len(labels)),
    ]
    for key, case in batch1.items():
        prompt, new = key.split("/")
        cells = [_spread(case["peers"].get(peer, {}).get("decode_tok_s")) for peer in COLUMNS]
        ratios = [_times(quantized["ratios"][key].get(label)) for label in labels]
        lines.append(f"| decode tok/s, prompt {prompt}, {new} new | {' | '.join(cells + ratios)} |")
    servers = quantized["servers"]
    if servers:
        cells = [
            _spread(servers[server]["aggregate_decode_tok_s"]) if server in servers else "n/a"
            for server in SERVERS
        ]
        shown = ", ".join(
            f"{SERVERS[server]} {_times(quantized['aggregate_vs_fp32'].get(server))}"
            for server in SERVERS
            if server in servers and server != "grpc"
        )
        lines += [
            "",
            (
                f"Through gRPC, {quantized['streams']} concurrent streams (prompt 128, 128 new tokens), aggregate "
                f"decode tok/s: fp32 {cells[0]}, int8 {cells[1]}, int4 {cells[2]}; ÷ fp32: {shown}. "
                "(onnxruntime-genai and llama-bench have no server with continuous batching to compare here.)"
            ),
        ]
    return lines


def _decode(peers: dict[str, Any], peer: str) -> float | None:
    value = peers.get(peer, {}).get("decode_tok_s")
    return None if value is None else float(value["median"])


def _spread(value: dict[str, Any] | None) -> str:
    if value is None:
        return "n/a"
    if value["n"] == 1:
        return f"{value['median']:.0f}"
    return f"{value['median']:.0f} ({value['min']:.0f}–{value['max']:.0f})"


def _times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}×"
