"""The two onnxruntime builds the tests run the server's code under, and how to reach each.

`.venv` holds onnxruntime (the CPU wheel) with everything else. `.venv-ort-gpu`, which `make test`
builds (Makefile: gpu-venv), holds onnxruntime-gpu and the server's runtime dependencies only: the
code comes from server/, sdk/ and tests/ through PYTHONPATH. Both versions are pinned in
pyproject.toml's extras, the one place that names them.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parent.parent
GPU_VENV_PYTHON = REPO / ".venv-ort-gpu" / "bin" / "python"
REFUSAL_TIMEOUT_S = 60


def pinned_version(distribution: str, extra: str) -> str:
    """The version `extra` pins `distribution` to (`name==version` in pyproject.toml)."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    for requirement in pyproject["project"]["optional-dependencies"][extra]:
        name, _, version = requirement.partition("==")
        if name.strip() == distribution and version:
            return version.strip()
    raise AssertionError(f"pyproject.toml's [{extra}] extra does not pin {distribution} with ==")


def code_env(**extra: str) -> dict[str, str]:
    """This environment plus the repository's code first on PYTHONPATH (what .venv-ort-gpu runs it
    with). What PYTHONPATH held stays after it: on a GPU machine without network the wheels are
    installed into a folder there (scripts/gpu_device_check.sh)."""
    folders = [str(REPO / folder) for folder in ("server", "sdk", "tests")]
    inherited = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*folders, *inherited]), **extra}


def gpu_venv_python() -> Path:
    if not GPU_VENV_PYTHON.exists():
        pytest.fail(
            f"{GPU_VENV_PYTHON.parent.parent.name} is missing: `make test` (or `make gpu-venv`) builds it"
        )
    return GPU_VENV_PYTHON


def assert_server_refuses_cuda(python: Path | str, model_dir: Path) -> None:
    """`textgen-server --provider cuda` with every GPU hidden exits 1 with a one-line error.

    CUDA_VISIBLE_DEVICES="" makes the check hold on a machine with a GPU too: there onnxruntime-gpu
    offers CUDA, fails to start it and would carry on with the CPU, which the server must refuse.
    """
    command = [str(python), "-m", "textgen_server", "--model-dir", str(model_dir), "--provider", "cuda"]
    try:
        result = subprocess.run(
            [*command, "--port", "0"],
            check=False,
            env=code_env(CUDA_VISIBLE_DEVICES=""),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=REFUSAL_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(command)} still ran after {exc.timeout} s: it served instead of refusing")
    lines = result.stderr.strip().splitlines()
    # The server's own records ("... ERROR textgen_server: ..."); onnxruntime's log says "[E:onnxruntime".
    errors = [line for line in lines if " ERROR " in line]
    assert result.returncode == 1, result.stderr
    assert errors == lines[-1:], result.stderr
    assert "cuda" in errors[0].lower(), errors[0]
