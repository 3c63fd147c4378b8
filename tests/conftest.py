"""Shared fixtures: one tiny demo model per test session, built with the real exporter."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from textgen_export.demo import build_demo

    out = tmp_path_factory.mktemp("models") / "tiny"
    build_demo(out, size="tiny")
    return out
