"""One request's generation state: what it asked for, and the objects that pick, stop and decode.

The scheduler owns many of these and feeds each its row of logits; everything request-specific
(sampling, stopping, detokenizing) lives here so the scheduler deals in batches only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .detokenizer import IncrementalDetokenizer
from .sampling import SamplingParams, TokenChooser
from .stopping import FinishReason, StoppingCriteria
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request: token ids and parameters; nothing here needs checking again."""

    request_id: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    lora: str | None = None

    @property
    def max_total_tokens(self) -> int:
        """The most KV-cache positions this request can ever occupy."""
        return len(self.prompt_ids) + self.max_new_tokens


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, with the text that became safe to emit with it."""

    token_id: int
    text: str
    special: bool
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int


class Generation:
    """Turns rows of logits into tokens and text for one request."""

    def __init__(self, request: GenerationRequest, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.request = request
        self._tokenizer = tokenizer
        self._chooser = TokenChooser.from_params(request.sampling, request.prompt_ids, vocab_size)
        self._stopping = StoppingCriteria(tokenizer.eos_id, request.max_new_tokens, request.stop)
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self.completion_tokens = 0
        self.last_token: int | None = None
        self.finish_reason: FinishReason | None = None

    def step(self, logits: npt.NDArray[np.float32]) -> TokenEvent:
        """Pick the next token from `logits` [vocab] and say what to emit."""
        token = self._chooser.choose(logits)
        self.last_token = token
        self.completion_tokens += 1
        last_allowed = self.completion_tokens >= self.request.max_new_tokens
        if token == self._tokenizer.eos_id:
            # EOS has no text; bytes of a character it cut short are decoded as full decode does.
            decision = self._stopping.step(token, "")
            text = decision.text + self._detokenizer.flush()
        else:
            delta = self._detokenizer.push(token)
            if last_allowed:
                delta += self._detokenizer.flush()
            decision = self._stopping.step(token, delta)
            text = decision.text
        self.finish_reason = decision.finish_reason
        return TokenEvent(
            token,
            text,
            self._tokenizer.is_special(token),
            self.finish_reason,
            len(self.request.prompt_ids),
            self.completion_tokens,
        )

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
