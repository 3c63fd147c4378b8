"""The two PNGs: aggregate throughput vs concurrency, and latency percentiles vs concurrency."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on the build machines
import matplotlib.pyplot as plt
from matplotlib import ticker


def plot_all(summary: dict[str, Any], out: Path) -> list[Path]:
    sweep = summary["concurrency"]
    if "levels" not in sweep:
        return []
    title = f"{summary['machine']['cpu']}, {summary['config']['threads']} threads, {summary['machine']['date'][:10]}"
    return [
        throughput_vs_concurrency(sweep, title, out / "throughput_vs_concurrency.png"),
        latency_percentiles(sweep, title, out / "latency_percentiles.png"),
    ]


def throughput_vs_concurrency(sweep: dict[str, Any], title: str, path: Path) -> Path:
    levels = [int(level) for level in sweep["levels"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = 0.0
    for measure, label in (
        ("aggregate_decode_tok_s", "decode only"),
        ("aggregate_tok_s", "prefill included"),
    ):
        agg = [sweep["levels"][str(level)][measure] for level in levels]
        medians = [a["median"] for a in agg]
        errors = [[m - a["min"] for m, a in zip(medians, agg)], [a["max"] - m for m, a in zip(medians, agg)]]
        ax.errorbar(levels, medians, yerr=errors, marker="o", capsize=4, label=f"{label} (median, min–max)")
        top = max(top, *(a["max"] for a in agg))
    one = sweep["levels"][str(levels[0])]["aggregate_decode_tok_s"]["median"]
    ax.plot(
        levels,
        [one * n / levels[0] for n in levels],
        linestyle=":",
        color="grey",
        label="linear scaling of decode",
    )
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(n) for n in levels])
    ax.set_ylim(0, top * 1.25)  # the linear line runs off the top: it is a reference, not data
    ax.set_xlabel("concurrent gRPC streams")
    ax.set_ylabel("tokens/s, all streams")
    ax.set_title(
        f"Throughput vs concurrency (prompt {sweep['prompt_tokens']}, {sweep['new_tokens']} new)\n{title}",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_percentiles(sweep: dict[str, Any], title: str, path: Path) -> Path:
    levels = [int(level) for level in sweep["levels"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, measure, label in (
        (left, "ttft_s", "time to first token"),
        (right, "inter_token_s", "inter-token latency"),
    ):
        for q, style in (("p50", "-o"), ("p99", "--s")):
            ax.plot(levels, [sweep["levels"][str(n)][measure][q] * 1000 for n in levels], style, label=q)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(levels, [str(n) for n in levels])
        plain = ticker.FuncFormatter(lambda value, _: f"{value:g}")  # 200, not 2x10^2
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_xlabel("concurrent gRPC streams")
        ax.set_ylabel("ms")
        ax.set_title(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle(f"Latency percentiles\n{title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
