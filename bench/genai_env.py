"""onnxruntime-genai in its own virtualenv, and its model built from the bench checkpoint.

Its model builder imports model classes that only transformers 5 has, while this project pins
transformers < 4.58 (optimum-onnx): hence a separate bench/.venv-genai, made on first use. Anything
that fails here makes genai "unavailable" with the reason, never the whole bench.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from . import stamps

# What the builder needs: torch (2.13.0 is the local CPU wheel; any other spec pulls CUDA builds),
# transformers 5 (the builder imports Qwen3.5 classes), onnx-ir, and sentencepiece to read the
# checkpoint's tokenizer.model. Exact pins for genai and transformers: the builder follows them closely.
REQUIREMENTS = (
    "onnxruntime-genai==0.18.0",
    "torch==2.13.0",
    "transformers==5.24.0",
    "onnx>=1.17",
    "onnx-ir>=0.1",
    "sentencepiece>=0.2",
    "numpy>=1.26",
)
VENV = Path("bench/.venv-genai")
# Its builder's precisions measured: fp32 beside this engine's fp32, int4 (`-p int4`: MatMulNBits with
# the builder's own CPU defaults) beside this engine's int4.
MODELS = {precision: Path(f"bench/models/genai-bench-{precision}") for precision in ("fp32", "int4")}


@dataclass(frozen=True)
class GenaiSetup:
    python: Path | None
    model_dirs: dict[str, Path]  # precision -> its genai model folder
    unavailable: str | None  # why genai cannot be measured here; None when it can


def ensure_genai(repo: Path, checkpoint: Path, log_path: Path) -> GenaiSetup:
    """Make the virtualenv and the genai models where missing or stale; report why not when that fails."""
    venv = repo / VENV
    python = venv / "bin" / "python"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a", encoding="utf-8") as log:
        try:
            want = stamps.digest("\n".join(REQUIREMENTS))
            if stamps.read(venv) != want:
                print(
                    f"bench: creating {VENV} for onnxruntime-genai (first run only, a few minutes) ...",
                    flush=True,
                )
                shutil.rmtree(venv, ignore_errors=True)
                _run([sys.executable, "-m", "venv", str(venv)], log, 120)
                # Bounded: an unreachable index must not eat the 15 minutes `make bench` has.
                pip = [str(python), "-m", "pip", "install", "--quiet", "--timeout", "60", "--retries", "2"]
                _run([*pip, "--upgrade", "pip"], log, 180)
                _run([*pip, *REQUIREMENTS], log, 480)
                stamps.write(venv, want)
            weights = stamps.digest(stamps.files_fingerprint(checkpoint, "*.safetensors") + want)
            for precision, folder in MODELS.items():
                _build_model(python, checkpoint, repo / folder, precision, weights, log)
        except subprocess.CalledProcessError as exc:
            log.flush()
            last = [
                line
                for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines()
                if line.strip()
            ]
            step = " ".join(Path(exc.cmd[0]).name if i == 0 else a for i, a in enumerate(exc.cmd[:4]))
            return GenaiSetup(None, {}, f"`{step} ...` failed: {last[-1] if last else exc} (log: {log_path})")
        except subprocess.TimeoutExpired as exc:
            return GenaiSetup(
                None,
                {},
                f"`{Path(exc.cmd[0]).name} {' '.join(exc.cmd[1:4])} ...` took over "
                f"{exc.timeout:.0f} s (log: {log_path})",
            )
        except OSError as exc:
            return GenaiSetup(None, {}, f"{exc} (log: {log_path})")
    return GenaiSetup(python, {precision: repo / folder for precision, folder in MODELS.items()}, None)


def _build_model(
    python: Path, checkpoint: Path, model: Path, precision: str, weights: str, log: TextIO
) -> None:
    """The builder's model of `checkpoint` at `precision` for the CPU, unless its stamp says it is current."""
    if stamps.read(model) == weights:
        return
    print(f"bench: building the genai model from {checkpoint} ({precision}, cpu) ...", flush=True)
    shutil.rmtree(model, ignore_errors=True)
    cache = model.parent / f"genai-cache-{precision}"
    _run(
        [
            str(python),
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(checkpoint),
            "-o",
            str(model),
            "-p",
            precision,
            "-e",
            "cpu",
            "-c",
            str(cache),
        ],
        log,
        300,
    )
    shutil.rmtree(cache, ignore_errors=True)
    stamps.write(model, weights)


def _run(command: list[str], log: TextIO, timeout_s: float) -> None:
    subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
