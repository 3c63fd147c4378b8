"""Stopping: decides, token by token, when a sequence ends and which text may be streamed now.

The caller forwards each generated token id with the detokenizer's new text; `StoppingCriteria.step`
answers with the text that is safe to emit and, on the last step, why generation ended:

- EOS: finish "stop"; the EOS token's own text is never emitted, held-back text is released.
- a stop string completes: finish "stop"; the text before it is emitted, the stop string and anything
  after it never are. Text that could be the start of a stop string is held back until it is decided,
  so a stop string spread over several tokens is never emitted, not even in part.
- the max_new_tokens-th token: finish "length"; held-back text is released.

When a step matches more than one rule, EOS wins over a stop string, and a stop string over the length
limit (the model did end its answer). When stop strings overlap, the one that completes first wins
(the earliest end in the text; of those ending together, the longest): this depends only on the text,
never on how it was split into tokens. `flush` releases held-back text when generation ends for a
reason decided elsewhere (the server's max_total_tokens, cancellation).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["MAX_STOP_SEQUENCES", "FinishReason", "StopDecision", "StoppingCriteria"]

MAX_STOP_SEQUENCES = 4


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"


@dataclass(frozen=True)
class StopDecision:
    """What one step decided: text safe to emit now (may be empty) and, when the sequence has ended,
    why."""

    text: str
    finish_reason: FinishReason | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class StoppingCriteria:
    """One sequence's stopping rules (see the module docstring)."""

    def __init__(self, eos_id: int, max_new_tokens: int, stop_sequences: Sequence[str] = ()) -> None:
        if isinstance(stop_sequences, str):  # a bare string is a Sequence[str] of its characters
            raise TypeError("stop_sequences must be a sequence of strings, not a string")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        stops = tuple(stop_sequences)
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        self.eos_id = eos_id
        self.max_new_tokens = max_new_tokens
        self.stop_sequences = stops
        self.generated_tokens = 0
        self.finish_reason: FinishReason | None = None
        self._closed = False
        self._held = ""  # the longest suffix of the text so far that is a proper prefix of a stop string
        # Every proper prefix of every stop string, for the hold-back test.
        self._max_hold = max((len(s) - 1 for s in stops), default=0)
        self._prefixes = frozenset(s[:n] for s in stops for n in range(1, len(s)))

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def step(self, token_id: int, text_delta: str) -> StopDecision:
        """Account for one generated token and its new text; return what may be emitted now. EOS has
        no text of its own: its `text_delta` is what ending the text released (the bytes of a
        character it cut short, text held back meanwhile), and stop strings apply to it as to any."""
        if self.finish_reason is not None or self._closed:
            raise RuntimeError("step() after the sequence finished")
        self.generated_tokens += 1
        text = self._held + text_delta  # at EOS: what was held, and what ending the text released
        cut = self._first_stop(text)
        if cut is not None:
            self._held = ""
            return self._finish(FinishReason.STOP, text[:cut])
        if token_id == self.eos_id:
            self._held = ""
            return self._finish(FinishReason.STOP, text)
        if self.generated_tokens >= self.max_new_tokens:
            self._held = ""
            return self._finish(FinishReason.LENGTH, text)

        hold = self._hold_length(text)
        self._held = text[len(text) - hold :]
        return StopDecision(text[: len(text) - hold])

    def flush(self) -> str:
        """Release held-back text when generation ends for another reason; no step() may follow."""
        self._closed = True  # the caller knows why it ended and reports the finish reason itself
        return self._take_held()

    def _finish(self, reason: FinishReason, text: str) -> StopDecision:
        self.finish_reason = reason
        return StopDecision(text, reason)

    def _take_held(self) -> str:
        held, self._held = self._held, ""
        return held

    def _first_stop(self, text: str) -> int | None:
        """Start of the stop string that completes first in text (earliest end, then longest), if any.

        Searching held + delta suffices: text already emitted cannot begin an occurrence, since
        the held text is the longest suffix that could.
        """
        best: tuple[int, int] | None = None  # (end, start)
        for s in self.stop_sequences:
            start = text.find(s)
            if start >= 0 and (best is None or (start + len(s), start) < best):
                best = (start + len(s), start)
        return None if best is None else best[1]

    def _hold_length(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        for n in range(min(self._max_hold, len(text)), 0, -1):
            if text[-n:] in self._prefixes:
                return n
        return 0
