"""Prefix caching: the free KV slots keep what the sequences that left them computed.

A chat resends the whole conversation with each turn, and many requests share a system prompt, so a
new prompt often starts with tokens whose keys and values a sequence that just finished has already
written. When a sequence leaves the batch its slot is not cleared: this module remembers which tokens
(and which LoRA adapter) each free slot holds, and at admission the scheduler asks it for the free
slot sharing the longest prefix with the new prompt. The new sequence then starts from those positions
(copied into its own slot if they sit in another) and prefills only the rest, as vLLM's and
text-generation-inference's prefix caches do, here with whole slots instead of pages.

It is bookkeeping only; the scheduler moves the caches (Engine.move_slot) and must `forget` a slot as
soon as anything else is written into it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

# Shorter shared prefixes are not worth a slot copy: every chat prompt shares its first few tokens
# ("<s>[INST]") with every other.
MIN_REUSED_POSITIONS = 16


@dataclass
class _Held:
    tokens: npt.NDArray[np.int64]  # [positions]: the tokens whose keys and values the slot holds
    adapter: object | None  # the LoRA adapter they went through (None: the base model)
    used: int  # when it was held or last reused, on the cache's own clock (least recently used first)


class PrefixCache:
    """Which free KV slots hold which tokens' keys and values, and which one serves a new prompt."""

    def __init__(self, min_reused: int = MIN_REUSED_POSITIONS) -> None:
        self.min_reused = min_reused
        self._held: dict[int, _Held] = {}
        self._clock = 0

    def __len__(self) -> int:
        return len(self._held)

    def holds(self, slot: int) -> bool:
        return slot in self._held

    def positions(self, slot: int) -> int:
        """How many positions `slot` holds (0: none)."""
        held = self._held.get(slot)
        return len(held.tokens) if held is not None else 0

    def hold(self, slot: int, tokens: Sequence[int], adapter: object | None) -> None:
        """Free slot `slot` keeps the keys and values of `tokens`, computed through `adapter`."""
        if len(tokens) < self.min_reused:
            self._held.pop(slot, None)
            return
        self._clock += 1
        self._held[slot] = _Held(np.asarray(tokens, dtype=np.int64), adapter, self._clock)

    def forget(self, slot: int) -> None:
        """`slot` is being written again: what it held is gone."""
        self._held.pop(slot, None)

    def moved(self, source: int, target: int) -> None:
        """What `source` held was copied into `target`, and `source` is about to be written."""
        self._held[target] = self._held.pop(source)

    def clear(self) -> None:
        self._held.clear()

    def match(
        self, prompt: Sequence[int], adapter: object | None, slots: Iterable[int], prefer: int
    ) -> tuple[int, int] | None:
        """The slot among `slots` whose tokens share the longest prefix with `prompt` through the same
        adapter, and that prefix's length, or None below `min_reused` positions. The prefix stops one
        short of the prompt: its last token must go through a forward pass, whose logits choose the
        first new token. On equal lengths `prefer` wins (no copy needed)."""
        wanted = np.asarray(prompt, dtype=np.int64)  # [prompt]
        best: tuple[int, bool, int] | None = None  # (length, preferred, slot)
        for slot in slots:
            held = self._held.get(slot)
            if held is None or held.adapter is not adapter:
                continue
            common = min(len(held.tokens), len(wanted) - 1)
            if common < self.min_reused:
                continue
            differ = np.flatnonzero(held.tokens[:common] != wanted[:common])
            length = int(differ[0]) if differ.size else common
            if length >= self.min_reused and (best is None or (length, slot == prefer) > best[:2]):
                best = (length, slot == prefer, slot)
        if best is None:
            return None
        length, _, slot = best
        self._clock += 1
        self._held[slot].used = self._clock
        return slot, length

    def refuge(self, slot: int, slots: Iterable[int]) -> int | None:
        """Where to copy what `slot` holds before it is written over: the slot among `slots` that
        `spare` picks, if it holds nothing or something used less recently; else None."""
        held = self._held.get(slot)
        if held is None:
            return None
        target = self.spare(slots)
        if target is None or (target in self._held and self._held[target].used > held.used):
            return None
        return target

    def spare(self, slots: Iterable[int]) -> int | None:
        """The slot among `slots` to write over: one that holds nothing, else the least recently used."""
        candidates = list(slots)
        if not candidates:
            return None
        empty = [slot for slot in candidates if slot not in self._held]
        if empty:
            return min(empty)
        return min(candidates, key=lambda slot: self._held[slot].used)
