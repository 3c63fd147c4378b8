"""Shared fixtures for the tokenizer, prompt and detokenizer tests: the real Mistral v1 SentencePiece model.

Import the fixtures by name into a test module (pytest finds fixtures in the module namespace). The
tokenizer.json is built once per session: a second module importing these fixtures finds the file
already in the session's base temp dir instead of converting again.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import mistral_common
import pytest
import sentencepiece
from textgen_export.tokenizer import build_tokenizer_json
from textgen_server.grammar import GrammarCompiler
from textgen_server.tokenizer import Tokenizer

SPM_MODEL = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


@pytest.fixture(scope="session")
def spm_model_path() -> Path:
    assert SPM_MODEL.is_file(), f"mistral-common no longer ships {SPM_MODEL}"
    return SPM_MODEL


@pytest.fixture(scope="session")
def tokenizer_json(spm_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.getbasetemp() / "mistral-v1-tokenizer" / "tokenizer.json"
    if not out.is_file():
        build_tokenizer_json(spm_model_path, out)
    return out


@pytest.fixture(scope="session")
def tok(tokenizer_json: Path) -> Tokenizer:
    return _load(tokenizer_json)


@pytest.fixture(scope="session")
def sp(spm_model_path: Path) -> sentencepiece.SentencePieceProcessor:
    return _sentencepiece(spm_model_path)


@cache
def _load(path: Path) -> Tokenizer:
    return Tokenizer.from_file(path)


@cache
def _sentencepiece(path: Path) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(path))


@pytest.fixture(scope="session")
def grammars(tokenizer_json: Path, tok: Tokenizer) -> GrammarCompiler:
    """llguidance's view of the same tokenizer (about 0.3 s to build)."""
    return GrammarCompiler.from_file(tokenizer_json, eos_id=tok.eos_id, vocab_size=tok.vocab_size)
