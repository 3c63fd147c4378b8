"""LoRA adapters under load (issue 11): 16 streams through the server, all base vs four adapters mixed.

Three configurations, interleaved in every repetition (rotated order), each 16 concurrent gRPC streams
of the sweep's prompt and length:
- `plain`: the bench model exported without adapter slots (the concurrency sweep's server);
- `lora_base`: the same weights exported with 4 slots of rank 16, every request on the base model;
- `lora_mixed`: that server, the requests spread evenly over four adapters (ranks 8, 16, 8, 16).
The issue's target compares `lora_mixed` with `lora_base` (the same server, same run); `plain` shows
what having adapter slots costs a server whose requests name none.

The adapters are random PEFT LoRAs on every projection (peft, non-zero B), converted with
`textgen-export lora`, as a user would.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from . import stamps
from .cells import times
from .stats import median, paired_ratios, ratio

LORA_MODEL = Path("models/bench-lora")
SLOTS = 4
RANK = 16
ADAPTER_RANKS = (8, 16, 8, 16)
CONFIGURATIONS = ("plain", "lora_base", "lora_mixed")
TARGET_MIXED_VS_BASE = 0.8


def adapter_names() -> list[str]:
    return [f"adapter{i}-r{rank}" for i, rank in enumerate(ADAPTER_RANKS)]


def ensure_lora_model(repo: Path, bench_model: Path) -> tuple[Path, Path]:
    """models/bench-lora (the bench weights with adapter slots) and its adapters/ directory, made
    again when the exporter changed since (like the plain graph it is compared with)."""
    model_dir = repo / LORA_MODEL
    adapters = model_dir / "adapters"
    exporter = stamps.exporter_digest(repo)
    current = stamps.read(model_dir) == exporter
    if current and _loadable(model_dir) and all((adapters / f"{n}.npz").is_file() for n in adapter_names()):
        return model_dir, adapters
    from textgen_export.lora import convert_peft_adapter
    from textgen_export.onnx_export import export_checkpoint

    export_checkpoint(
        bench_model / "checkpoint",
        model_dir,
        name="textgen-demo-bench-lora",
        overwrite=True,
        lora_slots=SLOTS,
        lora_rank=RANK,
    )
    peft_root = model_dir / "peft"
    for seed, (name, rank) in enumerate(zip(adapter_names(), ADAPTER_RANKS, strict=True)):
        peft_dir = _random_peft_adapter(bench_model / "checkpoint", peft_root / name, rank, seed)
        convert_peft_adapter(peft_dir, model_dir, adapters / name)
    shutil.rmtree(peft_root)
    stamps.write(model_dir, exporter)
    return model_dir, adapters


def _loadable(model_dir: Path) -> bool:
    if not (model_dir / "textgen.json").is_file():
        return False
    from textgen_server.engine import Engine

    try:
        Engine(model_dir, provider="cpu", threads=1, slots=1, max_len=64)
    except Exception:  # noqa: BLE001 -- an older export, whatever the error: it is built again
        return False
    return True


def _random_peft_adapter(checkpoint: Path, out: Path, rank: int, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import MistralForCausalLM

    torch.manual_seed(seed)
    model = MistralForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=modules, init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out, save_embedding_layers=False)
    return out


def summarize(runs: dict[str, list[list[dict[str, Any]]]], new_tokens: int) -> dict[str, Any]:
    """Per configuration the 16-stream aggregates; the ratios, medians and per repetition."""
    from .report import sweep_level

    if not runs:
        return {"unavailable": "not measured"}
    levels = {name: sweep_level(reps, new_tokens) for name, reps in runs.items() if reps}
    summary: dict[str, Any] = {
        "streams": len(next(iter(runs.values()))[0]),
        "slots": SLOTS,
        "rank": RANK,
        "adapter_ranks": list(ADAPTER_RANKS),
        "configurations": levels,
    }
    for high, low in (("lora_mixed", "lora_base"), ("lora_mixed", "plain"), ("lora_base", "plain")):
        key = f"{high}_vs_{low}"
        a, b = levels.get(high), levels.get(low)
        if a is None or b is None:
            continue
        measure = "aggregate_decode_tok_s"
        summary[key] = ratio(a[measure]["median"], b[measure]["median"])
        if len(a[measure]["samples"]) == len(b[measure]["samples"]):
            summary[f"{key}_per_repetition"] = paired_ratios(a[measure]["samples"], b[measure]["samples"])
    per_rep = summary.get("lora_mixed_vs_lora_base_per_repetition")
    summary["lora_mixed_vs_lora_base_paired_median"] = median(per_rep) if per_rep else None
    return summary


def markdown_lines(lora: dict[str, Any]) -> list[str]:
    if "configurations" not in lora:
        return ["", f"LoRA: not measured ({lora.get('unavailable')})."]
    names = {
        "plain": "plain graph, all base",
        "lora_base": f"{lora['slots']} adapter slots (rank {lora['rank']}), all base",
        "lora_mixed": "same server, 4 adapters mixed",
    }
    lines = [
        "",
        (
            f"LoRA adapters, {lora['streams']} concurrent streams through gRPC (adapters of ranks "
            f"{', '.join(map(str, lora['adapter_ranks']))}, spread evenly; the configurations interleaved):"
        ),
        "",
        "| configuration | aggregate decode tok/s | aggregate tok/s incl. prefill | TTFT p50 ms |",
        "|---|---|---|---|",
    ]
    for key, level in lora["configurations"].items():
        d, a = level["aggregate_decode_tok_s"], level["aggregate_tok_s"]
        lines.append(
            f"| {names.get(key, key)} | {d['median']:.0f} ({d['min']:.0f}–{d['max']:.0f}) | "
            f"{a['median']:.0f} ({a['min']:.0f}–{a['max']:.0f}) | {1000 * level['ttft_s']['p50']:.0f} |"
        )
    mixed = lora.get("lora_mixed_vs_lora_base")
    per_rep = lora.get("lora_mixed_vs_lora_base_per_repetition") or []
    plain = lora.get("lora_mixed_vs_plain")
    lines += [
        "",
        (
            f"Four adapters mixed ÷ all base, same server: **{times(mixed)}** (medians; within each "
            f"repetition {', '.join(f'{r:.2f}×' for r in per_rep)}; issue 11 target: at least "
            f"{TARGET_MIXED_VS_BASE}×). Against the plain graph: mixed {times(plain)}, all base on the "
            f"slotted graph {times(lora.get('lora_base_vs_plain'))}."
        ),
    ]
    return lines
