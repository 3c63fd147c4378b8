"""Prompts of an exact token length, the same for every peer.

Random token text: a random-weight model's greedy output does not care what it reads, and random ids
keep it from settling into the short loops a repeated word would give. For the gRPC path a prompt is
text, so it is made from ids and checked to encode back to exactly the wanted length.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

BOS_ID = 1
# Mistral's vocabulary: 0..2 are <unk>, <s>, </s>; 3..258 are the byte-fallback tokens <0x00>..<0xFF>.
FIRST_TEXT_ID = 259


def random_ids(count: int, rng: random.Random, vocab_size: int = 32000) -> list[int]:
    """`count` ids of whole text pieces (no control or byte tokens)."""
    return [rng.randrange(FIRST_TEXT_ID, vocab_size) for _ in range(count)]


def prompt_ids(length: int, rng: random.Random, vocab_size: int = 32000) -> list[int]:
    """A model input of `length` tokens: BOS, then random text pieces."""
    return [BOS_ID, *random_ids(length - 1, rng, vocab_size)]


def text_of_length(
    length: int,
    encode: Callable[[str], list[int]],
    decode: Callable[[Sequence[int]], str],
    rng: random.Random,
    vocab_size: int = 32000,
    tries: int = 50,
) -> str:
    """Text that `encode` turns into exactly `length` ids (a raw prompt: the server adds BOS before it).

    Decoding random ids and encoding the text again merges neighbours, so the length drifts: grow with
    more random ids while short, cut the encoded ids while long, until encode(text) has the length.
    """
    ids = random_ids(length, rng, vocab_size)
    for _ in range(tries):
        text = decode(ids)
        encoded = encode(text)
        if len(encoded) == length:
            return text
        ids = (
            encoded[:length]
            if len(encoded) > length
            else encoded + random_ids(length - len(encoded), rng, vocab_size)
        )
    raise ValueError(f"no text of exactly {length} tokens after {tries} tries")


def vocabulary_words(tokenizer_json: Path) -> list[str]:
    """Whole lowercase words of a tokenizer's vocabulary, for prompts measured in words."""
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer_json)).get_vocab()
    return sorted(
        word
        for word in (piece.removeprefix("▁") for piece in vocab if piece.startswith("▁"))
        if word.isalpha() and word.islower()
    )


def words_prompt(count: int, rng: random.Random, words: Sequence[str]) -> str:
    """`count` words drawn from `words`, joined by spaces: a prompt measured in words, as people write."""
    return " ".join(rng.choice(words) for _ in range(count))


def digits_of_length(length: int, encode: Callable[[str], list[int]], rng: random.Random) -> str:
    """Random digits that `encode` turns into exactly `length` ids: this tokenizer gives each digit a
    token of its own (and one for the leading space), so a long prompt fits the card's 6,144
    characters: about 6,000 tokens at most, where random text pieces average about 5 characters."""
    text = "".join(rng.choice("0123456789") for _ in range(length - 1))
    got = len(encode(text))
    if got != length:
        raise ValueError(
            f"{length - 1} digits encode to {got} ids, not {length}: a tokenizer without digit splitting"
        )
    return text
