"""Streaming deltas: concatenated they are the full decode, for every id sequence; no premature U+FFFD."""

# ruff: noqa: F811  (pytest fixtures are imported from tokenizer_fixtures and then requested by name)

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from textgen_server.detokenizer import IncrementalDetokenizer
from textgen_server.tokenizer import Tokenizer
from tokenizer_fixtures import spm_model_path, tok, tokenizer_json  # noqa: F401  (fixtures)

BYTE0 = 3  # <0x00>; byte b is id 3 + b
SPACE_PIECES = [28705, 259, 260]  # "▁", "▁▁", "▁▁▁▁"


def byte_ids(text: str) -> list[int]:
    return [BYTE0 + b for b in text.encode("utf-8")]


def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tok)
    return [detok.push(token_id) for token_id in ids] + [detok.flush()]


# Byte tokens both as whole valid characters (what a model usually emits for rare characters) and as
# arbitrary bytes (what a random model emits), mixed with ordinary pieces, spaces, controls and <unk>.
characters_as_bytes = st.characters(codec="utf-8", exclude_categories=["Cs"]).map(byte_ids)
any_token = st.one_of(
    st.integers(BYTE0, BYTE0 + 255).map(lambda i: [i]),
    characters_as_bytes,
    characters_as_bytes,
    st.integers(259, 31999).map(lambda i: [i]),
    st.sampled_from(SPACE_PIECES).map(lambda i: [i]),
    st.integers(0, 2).map(lambda i: [i]),
)
id_sequences = st.lists(any_token, max_size=30).map(lambda groups: [i for group in groups for i in group])


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=id_sequences)
def test_deltas_concatenate_to_the_full_decode(tok: Tokenizer, ids: list[int]) -> None:
    detok = IncrementalDetokenizer(tok)
    full = tok.decode(ids)
    emitted = ""
    for count, token_id in enumerate(ids, start=1):
        delta = detok.push(token_id)
        at = len(emitted)
        emitted += delta
        so_far = tok.decode(ids[:count])
        # What is out can never change: it is a prefix of every later decode ...
        assert so_far.startswith(emitted)
        # ... and only an unfinished character (at most 3 bytes, each at most one U+FFFD) is held back.
        assert len(so_far) - len(emitted) <= 3
        for offset, char in enumerate(delta):
            if char == "\ufffd":
                assert full[at + offset] == "\ufffd"
    emitted += detok.flush()
    assert emitted == full


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(codec="utf-8"), max_size=40))
def test_valid_text_never_shows_replacement_characters(tok: Tokenizer, text: str) -> None:
    # Every character spelled out in byte-fallback tokens, the worst case for splitting characters.
    deltas = stream(tok, byte_ids(text))
    assert "".join(deltas) == text
    if "\ufffd" not in text:
        assert all("\ufffd" not in delta for delta in deltas)


def test_character_split_over_byte_tokens(tok: Tokenizer) -> None:
    assert stream(tok, byte_ids("😀")) == ["", "", "", "😀", ""]
    assert stream(tok, byte_ids("é日")) == ["", "é", "", "", "日", ""]


def test_first_generated_piece_loses_its_leading_space(tok: Tokenizer) -> None:
    hello, world = tok.encode("Hello world")  # "▁Hello", "▁world"
    assert stream(tok, [hello, world]) == ["Hello", " world", ""]
    # Control tokens before it do not count as text, as in full decode.
    assert stream(tok, [tok.bos_id, hello]) == ["", "Hello", ""]
    # A byte token first is real text, so the following piece keeps its space.
    assert stream(tok, [*byte_ids("A"), hello]) == ["A", " Hello", ""]


def test_run_ended_mid_character(tok: Tokenizer) -> None:
    e6, x97 = byte_ids("日")[:2]
    hello = tok.encode("Hello")[0]
    assert stream(tok, [e6, x97, hello]) == ["", "", "\ufffd\ufffd Hello", ""]
    assert stream(tok, [e6, x97]) == ["", "", "\ufffd\ufffd"]  # only flush gives up on it
    assert stream(tok, [e6, tok.eos_id, x97]) == ["", "\ufffd", "\ufffd", ""]  # a control token ends the run


def test_invalid_bytes_come_out_at_once(tok: Tokenizer) -> None:
    # A byte that can never start a character is decided immediately; nothing is held back for it.
    assert stream(tok, [BYTE0 + 0x80, BYTE0 + 0xFF, *byte_ids("a")]) == ["\ufffd", "\ufffd", "a", ""]


def test_unknown_token(tok: Tokenizer) -> None:
    assert stream(tok, [tok.unk_id, tok.encode("Hello")[0]]) == [" \u2047 ", " Hello", ""]


def test_long_sequence_holds_nothing_back(tok: Tokenizer) -> None:
    ids = tok.encode("The quick brown fox 🦊 jumps over the lazy dog. " * 400)
    deltas = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids)
    assert deltas[-1] == ""


def test_out_of_vocabulary_id(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        IncrementalDetokenizer(tok).push(tok.vocab_size)
