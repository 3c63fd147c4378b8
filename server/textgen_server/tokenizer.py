"""Text ↔ token ids for a SentencePiece-style byte-fallback BPE vocabulary (Mistral, Llama), from `tokenizer.json`.

Encoding runs in the `tokenizers` library. Decoding is done here, from the vocabulary, because the library's
`ByteFallback` decoder differs from SentencePiece on ids a model can generate: it turns a whole run of byte
tokens into U+FFFD when any byte in it is invalid (SentencePiece replaces only the invalid bytes), it strips a
leading `<0x20>` as if it were the dummy-prefix space, and it drops `<unk>` (SentencePiece writes " ⁇ ").
`decode` follows SentencePiece's rules exactly; the incremental detokenizer builds on the same pieces.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# tokenizers ships .pyi stubs but no py.typed marker; `unused-ignore` keeps this quiet once mypy is told so.
from tokenizers import Tokenizer as _HfTokenizer  # type: ignore[import-untyped, unused-ignore]

SPACE = "▁"  # SentencePiece's visible space (U+2581)
UNK_SURFACE = " \u2047 "  # SentencePiece's default `unk_surface`, what it decodes <unk> to
REPLACEMENT = "\ufffd"
_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")


class TokenKind(enum.Enum):
    NORMAL = "normal"  # a piece of text; "▁" stands for a space
    BYTE = "byte"  # one raw UTF-8 byte (<0x00>..<0xFF>), the fallback for characters outside the vocabulary
    CONTROL = "control"  # <s>, </s>: no text at all
    UNKNOWN = "unknown"  # <unk>: never produced by encoding (byte fallback), decodes to " ⁇ "


@dataclass(frozen=True)
class Token:
    """What one id contributes to decoded text."""

    kind: TokenKind
    text: str  # NORMAL: the piece with "▁" as " "; UNKNOWN: " ⁇ "; otherwise ""
    byte: int  # BYTE: the byte's value; otherwise -1


class Tokenizer:
    """Encode text as SentencePiece does (no BOS/EOS; `<s>` in text is text) and decode ids back to text."""

    def __init__(self, hf: _HfTokenizer) -> None:
        # `<s>` typed by a user must stay text, as SentencePiece's encode treats it: no special-token matching.
        hf.encode_special_tokens = True
        self._hf = hf
        self._bos_id = _required_id(hf, "<s>")
        self._eos_id = _required_id(hf, "</s>")
        self._unk_id = _required_id(hf, "<unk>")
        self._vocab_size: int = hf.get_vocab_size(with_added_tokens=True)
        self._tokens = _token_table(hf, self._vocab_size, self._unk_id)
        # No token covers more characters of text than this (a byte covers at most one).
        self.longest_piece = max((len(t.text) for t in self._tokens if t.kind is TokenKind.NORMAL), default=1)
        first = hf.encode("a", add_special_tokens=False).tokens
        # SentencePiece prepends "▁" to the text (the dummy prefix) and drops it again when decoding.
        self._dummy_prefix = bool(first) and first[0].startswith(SPACE)

    @classmethod
    def from_file(cls, path: Path | str) -> Tokenizer:
        try:
            hf = _HfTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for unreadable or malformed files
            raise ValueError(f"cannot load tokenizer {path}: {exc}") from exc
        try:
            return cls(hf)
        except ValueError as exc:  # not SentencePiece-like: no <s>, no byte fallback, ...
            raise ValueError(f"tokenizer {path}: {exc}") from exc

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def unk_id(self) -> int:
        return self._unk_id

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def dummy_prefix(self) -> bool:
        """Whether encoding prepends "▁", so that decoding drops a leading space from the first piece."""
        return self._dummy_prefix

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` exactly as SentencePiece's encode: no BOS/EOS, control tokens in text are text."""
        # encode_batch, unlike encode, lets go of the GIL while it runs (the same ids, the same time):
        # tokenizing a long chat takes milliseconds, which every other thread would otherwise wait.
        ids: list[int] = self._hf.encode_batch([text], add_special_tokens=False)[0].ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` exactly as SentencePiece's decode: control tokens vanish, bytes join into UTF-8."""
        parts: list[str] = []
        run = bytearray()  # consecutive byte tokens; any other token ends the run
        at_start = True  # no text-bearing token seen yet (control tokens don't count)
        for token_id in ids:
            token = self.token(token_id)
            if token.kind is TokenKind.BYTE:
                run.append(token.byte)
                at_start = False
                continue
            if run:
                parts.append(decode_utf8(bytes(run), final=True)[0])
                run.clear()
            if token.kind is TokenKind.NORMAL:
                parts.append(self.piece_text(token, at_start))
                at_start = False
            elif token.kind is TokenKind.UNKNOWN:
                parts.append(token.text)
                at_start = False
        if run:
            parts.append(decode_utf8(bytes(run), final=True)[0])
        return "".join(parts)

    def token(self, token_id: int) -> Token:
        if not 0 <= token_id < self._vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{self._vocab_size - 1})")
        return self._tokens[token_id]

    def piece_text(self, token: Token, at_start: bool) -> str:
        """A NORMAL token's text; the first text-bearing token of a sequence loses the dummy-prefix space."""
        if at_start and self._dummy_prefix and token.text.startswith(" "):
            return token.text[1:]
        return token.text

    def kind(self, token_id: int) -> TokenKind:
        return self.token(token_id).kind

    def is_special(self, token_id: int) -> bool:
        """Control tokens and <unk>: never the result of encoding text."""
        return self.token(token_id).kind in (TokenKind.CONTROL, TokenKind.UNKNOWN)

    def id_to_piece(self, token_id: int) -> str:
        self.token(token_id)  # range check
        piece: str | None = self._hf.id_to_token(token_id)
        assert piece is not None  # every id below vocab_size has a piece (checked when the table was built)
        return piece

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes this token contributes to the text, before the dummy prefix is dropped."""
        token = self.token(token_id)
        if token.kind is TokenKind.BYTE:
            return bytes([token.byte])
        return token.text.encode("utf-8")


def decode_utf8(data: bytes, final: bool) -> tuple[str, int]:
    """Decode byte-token bytes as SentencePiece does; returns (text, bytes consumed).

    Each invalid byte becomes one U+FFFD (SentencePiece's rule; Python's "replace" would merge a broken
    sequence into one). With `final` false, a character that may still be completed by the next byte
    tokens is left unconsumed, so a stream never shows U+FFFD for a character split over tokens.
    """
    out: list[str] = []
    offset = 0
    while offset < len(data):
        need = _utf8_length(data[offset])
        if offset + need > len(data):
            if not final:
                break
            need = 1  # truncated at the end of the run: invalid, one byte at a time
        chunk = data[offset : offset + need]
        try:
            out.append(chunk.decode("utf-8"))  # strict: rejects overlongs, surrogates, > U+10FFFF
            offset += need
        except UnicodeDecodeError:
            out.append(REPLACEMENT)
            offset += 1
    return "".join(out), offset


def _utf8_length(lead: int) -> int:
    # The sequence length a lead byte announces; 1 for ASCII and for bytes that cannot start a sequence.
    if 0xC0 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF7:
        return 4
    return 1


def _required_id(hf: _HfTokenizer, piece: str) -> int:
    token_id: int | None = hf.token_to_id(piece)
    if token_id is None:
        raise ValueError(
            f"tokenizer has no {piece!r} token; expected a Mistral/Llama SentencePiece vocabulary"
        )
    return token_id


def _token_table(hf: _HfTokenizer, vocab_size: int, unk_id: int) -> list[Token]:
    special = {token_id for token_id, added in hf.get_added_tokens_decoder().items() if added.special}
    table: list[Token] = []
    byte_ids = 0
    for token_id in range(vocab_size):
        piece: str | None = hf.id_to_token(token_id)
        if piece is None:
            raise ValueError(
                f"tokenizer has no piece for id {token_id} below its vocabulary size {vocab_size}"
            )
        byte = _BYTE_PIECE.fullmatch(piece)
        if token_id == unk_id:
            table.append(Token(TokenKind.UNKNOWN, UNK_SURFACE, -1))
        elif token_id in special:
            table.append(Token(TokenKind.CONTROL, "", -1))
        elif byte is not None:
            table.append(Token(TokenKind.BYTE, "", int(byte.group(1), 16)))
            byte_ids += 1
        else:
            table.append(Token(TokenKind.NORMAL, piece.replace(SPACE, " "), -1))
    if byte_ids != 256:
        raise ValueError(f"tokenizer has {byte_ids} byte-fallback pieces <0x00>..<0xFF>, expected 256")
    return table
