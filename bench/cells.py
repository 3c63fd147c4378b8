"""Cells of the Markdown tables the report modules write (report, quantized, serving, lora)."""

from __future__ import annotations

from typing import Any


def times(value: float | None) -> str:
    """A ratio as "1.23×", or "n/a" where it was not measured."""
    return "n/a" if value is None else f"{value:.2f}×"


def spread_cell(s: dict[str, Any] | None, scale: float = 1, fmt: str = "{:.0f}") -> str:
    """A `stats.distribution` as "median (min–max)", scaled and formatted; the median alone for one
    repetition; "n/a" where there is none."""
    if s is None:
        return "n/a"
    if s["n"] == 1:
        return fmt.format(s["median"] * scale)
    return (
        f"{fmt.format(s['median'] * scale)} ({fmt.format(s['min'] * scale)}–{fmt.format(s['max'] * scale)})"
    )


def value_cell(value: float | None, fmt: str) -> str:
    """One number formatted, or "n/a"."""
    return "n/a" if value is None else fmt.format(value)
