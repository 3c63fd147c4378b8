"""The bench model's other forms, made on first use from its checkpoint: int4 and int8 exports (and
int4 with a 4-bit LM head) for the quantized rows, and the engine before engine v2 with its own
export, for the before/after rows.

The engine before v2 is commit `BEFORE_COMMIT` (left-padded batches, a KV cache concatenated every
step and copied when a request joins or leaves). Its `server`, `sdk` and `export` folders are taken
from git into build/before-engine; its workers run in this virtualenv with those folders on
PYTHONPATH ahead of the installed packages, and it exports the same checkpoint in its own format.
Anything that fails here makes that variant "unavailable" with the reason, never the whole bench.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import stamps

BEFORE_COMMIT = "4c1f449"
BEFORE_SOURCE = Path("build/before-engine")
BEFORE_MODEL = Path("models/bench-before")


@dataclass(frozen=True)
class QuantizedVariant:
    folder: Path
    dtype: str  # textgen-export --dtype
    lm_head: str | None = None  # textgen-export --lm-head (None: its default, int8)


# "int4-head4" is int4 with the 4-bit LM head that onnxruntime-genai's int4 build has too: the
# like-for-like row beside it (the bench model's LM head is 40% of its weights).
QUANTIZED_MODELS = {
    "int4": QuantizedVariant(Path("models/bench-int4"), "int4"),
    "int8": QuantizedVariant(Path("models/bench-int8"), "int8"),
    "int4-head4": QuantizedVariant(Path("models/bench-int4-head4"), "int4", lm_head="int4"),
}


@dataclass(frozen=True)
class BeforeSetup:
    source_paths: tuple[Path, ...]  # on the workers' PYTHONPATH: the old server and SDK
    model_dir: Path | None
    unavailable: str | None  # why it cannot be measured here; None when it can


def ensure_quantized(repo: Path, bench_model: Path, variant: str) -> Path:
    """models/bench-int4, -int8 or -int4-head4: the bench checkpoint exported as QUANTIZED_MODELS
    says (a minute or so, the quality measurement included), rebuilt when missing or made by other
    exporter code."""
    spec = QUANTIZED_MODELS[variant]
    model_dir = repo / spec.folder
    exporter = stamps.exporter_digest(repo)
    if stamps.read(model_dir) == exporter:
        return model_dir
    print(f"bench: exporting {spec.folder} from the bench checkpoint ({variant}) ...", flush=True)
    from textgen_export.onnx_export import export_checkpoint

    export_checkpoint(
        bench_model / "checkpoint",
        model_dir,
        dtype=spec.dtype,
        lm_head=spec.lm_head,
        name=f"textgen-demo-bench-{variant}",
        overwrite=True,
    )
    stamps.write(model_dir, exporter)
    return model_dir


def ensure_before(repo: Path, checkpoint: Path, log_path: Path) -> BeforeSetup:
    """The old engine's source tree and its export of `checkpoint`, made where missing or stale."""
    source = repo / BEFORE_SOURCE
    model = repo / BEFORE_MODEL
    paths = (source / "server", source / "sdk")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a", encoding="utf-8") as log:
        try:
            if stamps.read(source) != BEFORE_COMMIT:
                print(
                    f"bench: taking the engine before v2 ({BEFORE_COMMIT}) into {BEFORE_SOURCE} ...",
                    flush=True,
                )
                _extract(repo, source)
            weights = stamps.files_fingerprint(checkpoint, "*")
            if stamps.read(model) != BEFORE_COMMIT + weights:
                print(f"bench: exporting {BEFORE_MODEL} with the engine before v2 ...", flush=True)
                export = (
                    "import sys; from pathlib import Path; "
                    "from textgen_export.onnx_export import export_checkpoint; "
                    "export_checkpoint(Path(sys.argv[1]), Path(sys.argv[2]), name='textgen-demo-bench-before', "
                    "overwrite=True)"
                )
                subprocess.run(
                    [sys.executable, "-c", export, str(checkpoint), str(model)],
                    check=True,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=600,
                    env=_env_with(source / "export", *paths),
                )
                stamps.write(model, BEFORE_COMMIT + weights)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError, tarfile.TarError) as exc:
            return BeforeSetup(paths, None, f"{type(exc).__name__}: {exc} (log: {log_path})")
    return BeforeSetup(paths, model, None)


def _extract(repo: Path, source: Path) -> None:
    """`git archive` of the old commit's packages into `source`, replacing what was there."""
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    with tempfile.TemporaryFile() as archive:
        subprocess.run(
            ["git", "archive", "--format=tar", BEFORE_COMMIT, "server", "sdk", "export"],
            cwd=repo,
            check=True,
            stdout=archive,
            timeout=120,
        )
        archive.seek(0)
        with tarfile.open(fileobj=archive) as tar:
            tar.extractall(source, filter="data")
    stamps.write(source, BEFORE_COMMIT)


def _env_with(*paths: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env
