"""One request's generation state: what it asked for, and the objects that pick, stop and decode.

The scheduler owns many of these and feeds each its row of logits; everything request-specific
(sampling, grammar, stopping, detokenizing, tool calls) lives here so the scheduler deals in batches
only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .detokenizer import IncrementalDetokenizer
from .grammar import GrammarState, OutputConstraint
from .sampling import SamplingParams, TokenChooser
from .stopping import FinishReason, StoppingCriteria
from .tokenizer import Tokenizer
from .tools import CallSplitter, ToolCall


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request: token ids and parameters; nothing here needs checking again."""

    request_id: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    lora: str | None = None
    constraint: OutputConstraint | None = None  # JSON mode or tool calls: the grammar the output obeys

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
    tool_calls: tuple[ToolCall, ...] = ()  # on the last event: the calls made (their text is never emitted)
    # On the last event: the grammar failed mid-generation, or made calls no response can carry.
    error: str | None = None
    # With `error`: the request field whose schema the grammar engine gave up on (the request's
    # fault, INVALID_ARGUMENT); None where the failure is the server's (INTERNAL).
    error_field: str | None = None


class Generation:
    """Turns rows of logits into tokens and text for one request."""

    def __init__(self, request: GenerationRequest, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.request = request
        self._tokenizer = tokenizer
        self._chooser = TokenChooser.from_params(request.sampling, request.prompt_ids, vocab_size)
        self._stopping = StoppingCriteria(tokenizer.eos_id, request.max_new_tokens, request.stop)
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        constraint = request.constraint
        self.grammar: GrammarState | None = (
            constraint.grammar.start(greedy=request.sampling.greedy) if constraint is not None else None
        )
        self._calls = (
            CallSplitter(calls_only=not constraint.text_allowed)
            if constraint is not None and constraint.tool_calls
            else None
        )
        self.completion_tokens = 0
        self.last_token: int | None = None
        self.finish_reason: FinishReason | None = None

    def step(self, logits: npt.NDArray[np.float32]) -> TokenEvent:
        """Pick the next token from `logits` [vocab] and say what to emit."""
        grammar = self.grammar
        token = self._chooser.choose(logits) if grammar is None else self._choose_allowed(logits, grammar)
        self.last_token = token
        self.completion_tokens += 1
        if grammar is not None:
            grammar.advance(token)
        error = grammar.error if grammar is not None else None
        error_field = grammar.field if grammar is not None and grammar.gave_up else None
        grammar_done = grammar is not None and grammar.finished  # complete, or failed
        eos = token == self._tokenizer.eos_id
        ending = eos or grammar_done or self.completion_tokens >= self.request.max_new_tokens
        if eos:
            # EOS has no text; bytes of a character it cut short are decoded as full decode does,
            # and text held for the tool-call decision is released: stop strings apply to both.
            decision = self._stopping.step(token, self._visible(self._detokenizer.flush(), ending))
            text = decision.text
        else:
            delta = self._detokenizer.push(token)
            if ending:
                delta += self._detokenizer.flush()
            decision = self._stopping.step(token, self._visible(delta, ending))
            text = decision.text
        finish_reason = decision.finish_reason
        if grammar_done and finish_reason is not FinishReason.STOP:
            # A complete grammar ends the answer, also on the last token max_tokens allows.
            if finish_reason is None:
                text += self._stopping.flush()
            finish_reason = FinishReason.STOP
        self.finish_reason = finish_reason
        if error is None and self._calls is not None:
            error = self._calls.error
        return TokenEvent(
            token,
            text,
            self._tokenizer.is_special(token),
            finish_reason,
            len(self.request.prompt_ids),
            self.completion_tokens,
            tool_calls=self._calls.calls if self._calls is not None and finish_reason is not None else (),
            error=error,
            error_field=error_field,
        )

    def _choose_allowed(self, logits: npt.NDArray[np.float32], grammar: GrammarState) -> int:
        """The next token among those the grammar allows (after a failure: EOS only)."""
        if grammar.greedy:
            # The best token overall, when the grammar allows it, is the best allowed one: no mask.
            best = self._chooser.best(logits)
            if best is not None and grammar.allows(best):
                self._chooser.record(best)
                return best
        # The grammar's mask goes into sampling after the penalties.
        return self._chooser.choose(logits, grammar.allowed_mask())

    def _visible(self, delta: str, final: bool) -> str:
        """The part of the text that belongs to the response (not to tool calls)."""
        return delta if self._calls is None else self._calls.push(delta, final=final)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
