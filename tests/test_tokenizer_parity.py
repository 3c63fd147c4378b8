"""tokenizer.json (exported) + textgen_server.tokenizer ≡ SentencePiece on Mistral's tokenizer.model.v1."""

# ruff: noqa: F811  (pytest fixtures are imported from tokenizer_fixtures and then requested by name)

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sentencepiece import sentencepiece_model_pb2
from textgen_export.tokenizer import build_tokenizer_json, checkpoint_tokenizer, special_ids
from textgen_server.tokenizer import Tokenizer, TokenKind
from tokenizer_fixtures import sp, spm_model_path, tok, tokenizer_json  # noqa: F401  (fixtures)
from tokenizers import Tokenizer as HfTokenizer  # type: ignore[import-untyped, unused-ignore]

HARD_CASES = [
    "",
    "Hello world",
    " Hello world",
    "  leading double space",
    "double  space",
    "trailing space ",
    "trailing spaces   ",
    " ",
    "  ",
    " " * 17,
    " " * 40,
    "a" + " " * 33 + "b",
    "line\nbreak",
    "\n",
    "\n\n\nparagraphs\n\n",
    "\r\nwindows",
    "tab\there",
    "\t\t \tmixed \t",
    "0123456789",
    "3.14159 and 1,000,000 and 2024-01-01",
    "😀🎉👍🏽",
    "\U0001f9d1\u200d\U0001f4bb family: \U0001f468\u200d\U0001f469\u200d\U0001f467",
    "日本語のテキストです。",
    "中文文本，标点。",
    "한국어 텍스트",
    "Ελληνικά και русский и العربية و עברית",
    "\U0001d518\U00010348\u01c5",  # rare: byte fallback
    "\x00\x01\x1f\x7f",
    "\u200b\ufeff\u2028",
    "\ufffd replacement char",
    "▁ literal lower one eighth block ▁▁",
    "[INST] What is 2+2? [/INST]",
    "[INST]no spaces[/INST]",
    "<s>",
    "</s>",
    "<unk>",
    "<s>[INST] hi [/INST] ok</s>",
    "a <s> b </s> c <unk> d",
    "<<s>>",
    "<0x41> looks like a byte piece",
    "café naïve coöperate",
    "e\u0301 combining accent",
    "ﬁ ligature ＦＵＬＬＷＩＤＴＨ",
    "def f(x):\n    return x ** 2  # comment\n",
    '{"json": [1, 2.5, null, "str"]}',
    "https://example.com/path?q=1&r=2#frag",
]


def check_parity(tok: Tokenizer, sp: sentencepiece.SentencePieceProcessor, text: str) -> None:
    expected = sp.encode(text)
    assert tok.encode(text) == expected, text
    assert tok.decode(expected) == sp.decode(expected), text


@pytest.mark.parametrize("text", HARD_CASES)
def test_hard_cases(tok: Tokenizer, sp: sentencepiece.SentencePieceProcessor, text: str) -> None:
    check_parity(tok, sp, text)


def test_hello_world_keeps_the_dummy_prefix(tok: Tokenizer) -> None:
    # The trap the issue names: without SentencePiece's prepended "▁" the first word is "Hello", not "▁Hello".
    assert tok.encode("Hello world") == [22557, 1526]
    assert [tok.id_to_piece(i) for i in tok.encode("Hello world")] == ["▁Hello", "▁world"]


@pytest.mark.parametrize("spaces", range(1, 70))
def test_runs_of_spaces(tok: Tokenizer, sp: sentencepiece.SentencePieceProcessor, spaces: int) -> None:
    # Whitespace-only pieces all share one score; SentencePiece breaks the tie leftmost-first.
    for text in (" " * spaces, "x" + " " * spaces + "y", "\n" + " " * spaces + "\t", " " * spaces + "z"):
        check_parity(tok, sp, text)


FRAGMENTS = [
    " ",
    "  ",
    "\n",
    "\t",
    "<s>",
    "</s>",
    "<unk>",
    "[INST]",
    "[/INST]",
    "▁",
    "0",
    "42",
    "😀",
    "日本",
    "\U0001d518",
    "é",
    "e\u0301",
    "\x00",
    "Hello",
    " world",
    "ing",
    "'s",
]
texts = st.one_of(
    st.text(),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=40),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.characters(codec="utf-8")), max_size=25).map("".join),
)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
def test_generated_strings(tok: Tokenizer, sp: sentencepiece.SentencePieceProcessor, text: str) -> None:
    check_parity(tok, sp, text)


# Any id sequence a model can emit, not only what encoding produces: bytes that do not form UTF-8,
# control tokens inside byte runs, <unk>, a leading <0x20> or "▁▁".
token_ids = st.lists(
    st.one_of(
        st.integers(0, 2),
        st.integers(3, 258),
        st.sampled_from([3 + 0xE6, 3 + 0x97, 3 + 0xA5, 3 + 0xF0, 3 + 0x9F, 3 + 0x20, 28705, 259]),
        st.integers(259, 31999),
    ),
    max_size=16,
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=token_ids)
def test_decode_of_any_ids(tok: Tokenizer, sp: sentencepiece.SentencePieceProcessor, ids: list[int]) -> None:
    assert tok.decode(ids) == sp.decode(ids)


@pytest.mark.parametrize(
    ("ids", "text"),
    [
        (
            [3 + 0xE6, 3 + 0x97],
            "\ufffd\ufffd",
        ),  # a truncated character: one U+FFFD per byte, as SentencePiece
        ([3 + 0xE6, 1, 3 + 0x97, 3 + 0xA5], "\ufffd" * 3),  # a control token ends the byte run
        ([3 + 0x20, 22557], "  Hello"),  # a leading <0x20> is a real space, not the dummy prefix
        ([0, 22557], " \u2047  Hello"),  # <unk> is written the way SentencePiece writes it
        ([1, 22557, 2], "Hello"),
        ([28705, 28705], " "),
    ],
)
def test_decode_edge_cases(
    tok: Tokenizer, sp: sentencepiece.SentencePieceProcessor, ids: list[int], text: str
) -> None:
    assert sp.decode(ids) == text
    assert tok.decode(ids) == text


def test_special_ids_and_kinds(tok: Tokenizer) -> None:
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 32000)
    assert tok.kind(0) is TokenKind.UNKNOWN
    assert tok.kind(1) is TokenKind.CONTROL and tok.kind(2) is TokenKind.CONTROL
    assert all(tok.kind(i) is TokenKind.BYTE for i in range(3, 259))
    assert tok.token_bytes(3 + 0xE6) == b"\xe6"
    assert tok.token_bytes(22557) == b" Hello"
    assert [tok.is_special(i) for i in (0, 1, 2, 3, 22557)] == [True, True, True, False, False]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([32000])


def test_tokenizer_json_shape(tokenizer_json: Path) -> None:
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    assert spec["model"]["type"] == "BPE" and spec["model"]["byte_fallback"] is True
    assert [n["type"] for n in spec["normalizer"]["normalizers"]] == ["Prepend", "Replace"]
    assert spec["pre_tokenizer"] is None
    assert [d["type"] for d in spec["decoder"]["decoders"]] == ["Replace", "ByteFallback", "Fuse", "Strip"]
    specials = {t["content"]: t["id"] for t in spec["added_tokens"] if t["special"]}
    assert specials == {"<unk>": 0, "<s>": 1, "</s>": 2}
    assert special_ids(HfTokenizer.from_file(str(tokenizer_json))) == specials


def test_checkpoint_prefers_its_own_tokenizer_json(tokenizer_json: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    own = tokenizer_json.read_bytes()
    (checkpoint / "tokenizer.json").write_bytes(own)
    (checkpoint / "tokenizer.model").write_bytes(b"not read")
    checkpoint_tokenizer(checkpoint, tmp_path / "out" / "tokenizer.json")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == own


def test_checkpoint_converts_tokenizer_model(
    spm_model_path: Path, tokenizer_json: Path, tmp_path: Path
) -> None:
    (tmp_path / "tokenizer.model").write_bytes(spm_model_path.read_bytes())
    checkpoint_tokenizer(tmp_path, tmp_path / "out.json")
    assert (tmp_path / "out.json").read_text(encoding="utf-8") == tokenizer_json.read_text(encoding="utf-8")


def test_checkpoint_without_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no tokenizer: expected tokenizer.json or tokenizer.model"):
        checkpoint_tokenizer(tmp_path, tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


def test_checkpoint_with_broken_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not a valid tokenizers file"):
        checkpoint_tokenizer(tmp_path, tmp_path / "out" / "tokenizer.json")
    assert not (tmp_path / "out" / "tokenizer.json").exists()


def test_rejects_a_model_it_cannot_reproduce(spm_model_path: Path, tmp_path: Path) -> None:
    proto = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined, unused-ignore]
    proto.ParseFromString(spm_model_path.read_bytes())
    proto.trainer_spec.byte_fallback = False
    proto.normalizer_spec.remove_extra_whitespaces = True
    changed = tmp_path / "tokenizer.model"
    changed.write_bytes(proto.SerializeToString())
    with pytest.raises(ValueError, match="byte_fallback is off; remove_extra_whitespaces is on"):
        build_tokenizer_json(changed, tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="is not a SentencePiece model"):
        build_tokenizer_json(_garbage(tmp_path), tmp_path / "t.json")


def _garbage(tmp_path: Path) -> Path:
    path = tmp_path / "garbage.model"
    path.write_bytes(b"\xff\xfe definitely not a protobuf")
    return path
