"""Shared fixtures: one tiny demo model per test session, built with the real exporter."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import settings
from server_harness import ServerThread
from textgen.v1 import textgen_pb2_grpc as rpc
from textgen_server.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent

# CI (CI=true) replays the same examples every run, so that a landing never depends on luck;
# local runs keep exploring new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from textgen_export.demo import build_demo

    out = tmp_path_factory.mktemp("models") / "tiny"
    build_demo(out, size="tiny")
    return out


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    """The demo model's tokenizer (the real Mistral one)."""
    return Tokenizer.from_file(tiny_model_dir / "tokenizer.json")


@pytest.fixture(scope="session")
def quantized_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """The tiny demo with int4 or int8 weights (`quantized_model_dir("int4")`, or with a 4-bit LM head
    `quantized_model_dir("int4", lm_head="int4")`), each built once."""
    from textgen_export.demo import build_demo

    built: dict[tuple[str, str | None], Path] = {}

    def build(weight_dtype: str, lm_head: str | None = None) -> Path:
        key = (weight_dtype, lm_head)
        if key not in built:
            name = weight_dtype + (f"-lm-head-{lm_head}" if lm_head else "")
            out = tmp_path_factory.mktemp("quantized") / name
            build_demo(out, size="tiny", dtype=weight_dtype, lm_head=lm_head)
            built[key] = out
        return built[key]

    return build


@pytest.fixture(scope="session")
def lora_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo's weights exported with LORA_SLOTS adapter slots of rank up to LORA_RANK."""
    from random_adapters import LORA_RANK, LORA_SLOTS
    from textgen_export.onnx_export import export_checkpoint

    out = tmp_path_factory.mktemp("models") / "tiny-lora"
    export_checkpoint(
        tiny_model_dir / "checkpoint", out, name="tiny-lora", lora_slots=LORA_SLOTS, lora_rank=LORA_RANK
    )
    return out


@pytest.fixture(scope="session")
def server(tiny_model_dir: Path) -> Iterator[ServerThread]:
    """One in-process server on a free port for the whole session."""
    harness = ServerThread(tiny_model_dir)
    yield harness
    harness.stop(grace=1)


@pytest.fixture(scope="session")
def stub(server: ServerThread) -> Iterator[rpc.TextGenerationStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield rpc.TextGenerationStub(channel)
