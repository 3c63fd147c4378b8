"""SentencePiece model → `tokenizer.json` for the `tokenizers` library, tokenizing exactly as SentencePiece does.

The server loads only `tokenizer.json`, so this file must reproduce SentencePiece's BPE: the same ids for
every string. A plain transformers `LlamaTokenizerFast(vocab_file=...)` conversion (4.57, legacy or not)
leaves SentencePiece's dummy-prefix "▁" off unless `add_prefix_space=True`, so "Hello world" becomes
[16230, 1526] instead of SentencePiece's [22557, 1526]; here the prefix is part of the normalizer.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

# tokenizers ships .pyi stubs but no py.typed marker; `unused-ignore` keeps this quiet once mypy is told so.
from tokenizers import AddedToken, Tokenizer, decoders, normalizers  # type: ignore[import-untyped, unused-ignore]
from tokenizers.models import BPE  # type: ignore[import-untyped, unused-ignore]

SPACE = "▁"  # SentencePiece's visible space (U+2581)

# sentencepiece_model.proto, ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_MODEL_TYPE_BPE = 2


def build_tokenizer_json(spm_model_path: Path, out_path: Path) -> None:
    """Convert a SentencePiece BPE model (Mistral's / Llama's) into a `tokenizer.json` at `out_path`."""
    tokenizer = tokenizer_from_spm(spm_model_path)
    _write_atomically(out_path, tokenizer.to_str(pretty=False))


def checkpoint_tokenizer(checkpoint_dir: Path, out_path: Path) -> None:
    """Write the checkpoint's tokenizer to `out_path`: its own `tokenizer.json`, else its converted `tokenizer.model`."""
    own_json = checkpoint_dir / "tokenizer.json"
    spm_model = checkpoint_dir / "tokenizer.model"
    if own_json.is_file():
        # Parse it first so that a corrupt file fails here, not when the server starts.
        try:
            Tokenizer.from_file(str(own_json))
        except Exception as exc:  # tokenizers raises a bare Exception for malformed JSON
            raise ValueError(f"{own_json} is not a valid tokenizers file: {exc}") from exc
        _copy_atomically(own_json, out_path)
    elif spm_model.is_file():
        build_tokenizer_json(spm_model, out_path)
    else:
        raise ValueError(f"{checkpoint_dir} has no tokenizer: expected tokenizer.json or tokenizer.model")


def tokenizer_from_spm(spm_model_path: Path) -> Tokenizer:
    """Build the `tokenizers` equivalent of a SentencePiece BPE model with byte fallback."""
    from sentencepiece import sentencepiece_model_pb2  # export-only dependency

    # The protobuf class is generated at import time, so there is nothing static to type it with.
    proto: Any = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined, unused-ignore]
    try:
        proto.ParseFromString(spm_model_path.read_bytes())
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ValueError(f"{spm_model_path} is not a SentencePiece model: {exc}") from exc
    _check_supported(proto, spm_model_path)

    pieces: list[tuple[str, float, int]] = [(p.piece, p.score, p.type) for p in proto.pieces]
    vocab = {piece: index for index, (piece, _, _) in enumerate(pieces)}
    unk_piece = next(piece for piece, _, kind in pieces if kind == _UNKNOWN)
    model = BPE(
        vocab=vocab,
        merges=spm_merges(pieces),
        unk_token=unk_piece,
        fuse_unk=True,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(model)
    # SentencePiece's dummy prefix: "▁" before the whole text (not per word), then spaces become "▁".
    # Prepend leaves the empty string empty, as SentencePiece does.
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    # No pre-tokenizer: SentencePiece's BPE encoder merges across the whole string.
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace(SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),  # undo the dummy prefix, once, at the start of the text
        ]
    )
    specials = [piece for piece, _, kind in pieces if kind in (_UNKNOWN, _CONTROL)]
    tokenizer.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in specials])
    return tokenizer


def spm_merges(pieces: list[tuple[str, float, int]]) -> list[tuple[str, str]]:
    """BPE merges ranked the way SentencePiece applies them.

    SentencePiece merges the adjacent pair whose union has the highest score, leftmost first on ties. A
    `tokenizers` merge list ranks pairs instead, so every split of a piece into two vocabulary pieces
    becomes a merge, ranked by the piece's score. In Mistral's model, ties only occur among the whitespace-only
    pieces ("▁▁"… all at -1e9); there SentencePiece grows a run of spaces from the left ("▁▁"+"▁", then
    "▁▁▁"+"▁", …), which ranking the longer left half first reproduces (same order as transformers'
    `generate_merges`).
    """
    # Only normal pieces merge: byte pieces and control tokens never take part in BPE.
    vocab = {piece: index for index, (piece, _, kind) in enumerate(pieces) if kind == _NORMAL}
    ranked: list[tuple[float, int, int, int, str, str]] = []
    for piece, score, kind in pieces:
        if kind != _NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, -len(left), -len(right), vocab[piece], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _check_supported(proto: Any, path: Path) -> None:
    # Only what Mistral and Llama ship is reproduced exactly; anything else would silently mis-tokenize.
    trainer = proto.trainer_spec
    normalizer = proto.normalizer_spec
    problems: list[str] = []
    if trainer.model_type != _MODEL_TYPE_BPE:
        problems.append("model type is not BPE")
    if not trainer.byte_fallback:
        problems.append("byte_fallback is off")
    if trainer.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix is on")
    if not normalizer.add_dummy_prefix:
        problems.append("add_dummy_prefix is off")
    if normalizer.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces is on")
    if normalizer.precompiled_charsmap:
        problems.append(f"normalization rule {normalizer.name!r} is not identity")
    kinds = {p.type for p in proto.pieces}
    if _USER_DEFINED in kinds or _UNUSED in kinds:
        problems.append("user-defined or unused pieces are present")
    if _UNKNOWN not in kinds:
        problems.append("there is no <unk> piece")
    if problems:
        raise ValueError(f"{path}: unsupported SentencePiece model: {'; '.join(problems)}")


def _write_atomically(out_path: Path, text: str) -> None:
    # A crash mid-write must not leave a truncated tokenizer.json that looks valid by its name.
    _replace_with(out_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _copy_atomically(source: Path, out_path: Path) -> None:
    _replace_with(out_path, lambda tmp: shutil.copyfile(source, tmp))


def _replace_with(out_path: Path, write: Callable[[str], object]) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=out_path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def special_ids(tokenizer: Tokenizer, names: Iterable[str] = ("<unk>", "<s>", "</s>")) -> dict[str, int]:
    """Ids of the special tokens by name, for the exporter's model config."""
    found: dict[str, int] = {}
    for name in names:
        token_id = tokenizer.token_to_id(name)
        if token_id is None:
            raise ValueError(f"tokenizer has no {name!r} token")
        found[name] = token_id
    return found
