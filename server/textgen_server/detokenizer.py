"""Streaming text from generated token ids: one delta per token, never a broken character.

TGI's `decode_token` keeps prefix/read offsets and re-decodes a window, holding text back while it ends in
U+FFFD. Here the window is the only part that can still change, the bytes of an unfinished byte-fallback
run (at most 3), so each step is O(1) and the deltas are exact by construction rather than by diffing:
concatenated deltas + `flush()` == `Tokenizer.decode(all ids pushed)`, for every id sequence.
"""

from __future__ import annotations

from .tokenizer import Tokenizer, TokenKind, decode_utf8


class IncrementalDetokenizer:
    """Turns the ids of one generated sequence into text deltas, as `Tokenizer.decode` would render them."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        # Bytes of the current byte-token run not yet emitted: a character still incomplete (< 4 bytes).
        self._pending = bytearray()
        # Nothing text-bearing pushed yet: the first piece loses its dummy-prefix space, exactly as
        # decoding the generated ids alone does (the prompt before them does not count).
        self._at_start = True

    def push(self, token_id: int) -> str:
        """The text this token adds; "" while it only extends a character that is not complete yet."""
        token = self._tokenizer.token(token_id)
        if token.kind is TokenKind.BYTE:
            self._at_start = False
            self._pending.append(token.byte)
            text, used = decode_utf8(bytes(self._pending), final=False)
            del self._pending[:used]
            return text
        # Any other token ends the byte run, so what is pending is final now (U+FFFD per invalid byte).
        text = self.flush()
        if token.kind is TokenKind.NORMAL:
            text += self._tokenizer.piece_text(token, self._at_start)
            self._at_start = False
        elif token.kind is TokenKind.UNKNOWN:
            text += token.text
            self._at_start = False
        return text

    def flush(self) -> str:
        """Whatever is held back, resolved as the end of the sequence: call once generation has finished."""
        if not self._pending:
            return ""
        text, _ = decode_utf8(bytes(self._pending), final=True)
        self._pending.clear()
        return text
