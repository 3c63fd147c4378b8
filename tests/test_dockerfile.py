"""The Dockerfile, checked without a Docker engine.

hadolint lints it; docker-py's own .dockerignore matcher gives the build context Docker would send,
which must hold every COPY source and none of the virtualenvs, models or .git; each image's install
step runs into a fresh virtualenv from that context (the CPU image's for real, the GPU image's as
pip's resolution for the CUDA base image's Python), and the commands the images run parse with the
server's own argument parsers.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from docker.utils.build import PatternMatcher, exclude_paths
from dockerfile_stages import DOCKERFILE, Stage, exec_form, read_stages, root_image

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TARGETS = ("cpu", "gpu")
# The CUDA base's OS release → its Python and glibc, for resolving the GPU image's wheels here.
UBUNTU_PYTHON_GLIBC = {"ubuntu24.04": ("3.12", (2, 39)), "ubuntu22.04": ("3.10", (2, 35))}


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def build_context() -> set[str]:
    """The paths Docker sends as the build context (files and directories, relative)."""
    return {str(p) for p in exclude_paths(str(REPO), dockerignore_patterns())}


def test_hadolint_finds_nothing() -> None:
    hadolint = BIN / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr
    # The ignore pragmas hide unpinned apt packages only.
    unpragma = subprocess.run(
        [str(hadolint), "--disable-ignore-pragma", "--format", "json", "--no-fail", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert {finding["code"] for finding in json.loads(unpragma.stdout)} <= {"DL3008"}


def test_copy_sources_are_in_the_build_context() -> None:
    stages = read_stages()
    context = build_context()
    seen: list[str] = []
    for stage in stages.values():
        for value in stage.values("COPY"):
            *sources, _dest = shlex.split(value)
            if sources[0].startswith("--from="):
                assert sources[0].removeprefix("--from=") in seen, (
                    f"COPY {value}: no earlier stage of that name"
                )
                continue
            for source in sources:
                assert (REPO / source).exists(), f"COPY {value}: {source} does not exist"
                assert source in context, f"COPY {value}: .dockerignore leaves {source} out of the context"
        seen.append(stage.name)
    # What must never be sent: a dev install's .venv alone is 1.6 GB.
    ignored = PatternMatcher(dockerignore_patterns())
    for path in (
        ".venv/bin/python",
        ".venv-gpu/x",
        ".venv-export/x",
        "models/tiny/model.onnx",
        ".git/HEAD",
        "bench/results/latest.json",
        "bench/.venv-genai/x",
        "server/textgen_server/__pycache__/x.pyc",
        "textgen.egg-info/PKG-INFO",
        "tests/test_server.py",
    ):
        assert ignored.matches(path), f"{path} would be sent to the Docker daemon"
    assert not any(p.startswith((".venv", "models", ".git", "bench")) for p in context)


def test_two_targets_cpu_and_gpu_run_unprivileged() -> None:
    stages = read_stages()
    assert root_image(stages, "cpu") == "python:3.11-slim"
    assert re.fullmatch(r"nvidia/cuda:13\.[\d.]+-cudnn-runtime-ubuntu[\d.]+", root_image(stages, "gpu"))
    for target in TARGETS:
        stage = stages[target]
        (user,) = stage.values("USER")
        uid = user.split(":")[0]
        # Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
        assert uid.isdigit() and int(uid) != 0, f"{target} runs as {user!r}"
        assert stage.values("ENTRYPOINT") and stage.values("HEALTHCHECK"), target


def test_image_commands_parse(tiny_model_dir: Path) -> None:
    """The ENTRYPOINT's flags are the server's, the HEALTHCHECK's the health check's."""
    from textgen_server.__main__ import parse_args
    from textgen_server.healthcheck import build_parser as healthcheck_parser

    stages = read_stages()
    for target in TARGETS:
        command, *args = exec_form(stages[target].values("ENTRYPOINT")[0])
        assert command == "textgen-server"
        assert args[args.index("--model-dir") + 1] == "/model"
        settings = parse_args([str(tiny_model_dir) if a == "/model" else a for a in args])
        assert (settings.host, settings.port) == ("0.0.0.0", 50051)
        check = stages[target].values("HEALTHCHECK")[0]
        probe, *probe_args = exec_form(check[check.index("CMD") + 3 :].strip())
        assert probe == "textgen-healthcheck"
        assert healthcheck_parser().parse_args(probe_args).target == f"127.0.0.1:{settings.port}"
    assert "--provider" in exec_form(stages["gpu"].values("ENTRYPOINT")[0])


def install_spec(stages: dict[str, Stage], target: str) -> tuple[str, str]:
    """(path, extras) of the `pip install "PATH[EXTRAS]"` that builds the virtualenv `target` copies."""
    for builder in stages[target].copies_from():
        for run in stages[builder].values("RUN"):
            if match := re.search(r"pip install [^\"]*\"([^\"\[]+)\[([\w,-]+)\]\"", run):
                return match.group(1), match.group(2)
    raise AssertionError(f'{target}: no `pip install "PATH[EXTRAS]"` in the stage it copies from')


def assemble_sources(stages: dict[str, Stage], dest: Path) -> Path:
    """The `source` stage's files, copied from what the build context holds, as Docker would."""
    context = build_context()
    for value in stages["source"].values("COPY"):
        *sources, target = shlex.split(value)
        for source in sources:
            into = dest / target.lstrip("/")
            into = into / Path(source).name if target.endswith("/") else into
            if (REPO / source).is_dir():
                files = [p for p in context if p.startswith(source + "/") and (REPO / p).is_file()]
                for path in files:
                    (into / Path(path).relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(REPO / path, into / Path(path).relative_to(source))
            else:
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(REPO / source, into)
    return dest


@pytest.mark.slow
def test_cpu_image_install_step(tmp_path: Path) -> None:
    """The CPU image's extras, from the image's own sources, into a fresh virtualenv: the server starts."""
    stages = read_stages()
    path, extras = install_spec(stages, "cpu")
    root = assemble_sources(stages, tmp_path / "image")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # This virtualenv's pip installs into the new one (`--python`), reusing pip's cache.
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--quiet",
            "--no-compile",
            f"{root / path.lstrip('/')}[{extras}]",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    for command in ("textgen-server", "textgen-healthcheck"):
        result = subprocess.run(
            [str(venv / "bin" / command), "--help"], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0 and "usage:" in result.stdout, result.stderr[-3000:]
    # The image serves; it carries no exporter.
    probe = (
        "import importlib.util as u; print([m for m in ('torch', 'transformers', 'onnx') if u.find_spec(m)])"
    )
    found = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == "[]"


@pytest.mark.slow
def test_gpu_image_install_step_resolves(tmp_path: Path) -> None:
    """The GPU image's extras resolve to wheels for its base's Python and glibc, onnxruntime-gpu among them."""
    stages = read_stages()
    path, extras = install_spec(stages, "gpu")
    base = root_image(stages, "gpu")
    python, (glibc_major, glibc_minor) = UBUNTU_PYTHON_GLIBC[base.rsplit("-", 1)[-1]]
    root = assemble_sources(stages, tmp_path / "image")
    # Wheels tagged for any glibc up to the base's (pip does not widen an explicit --platform itself).
    platforms = [f"manylinux_{glibc_major}_{minor}_x86_64" for minor in range(17, glibc_minor + 1)]
    platforms.append("manylinux2014_x86_64")
    report = tmp_path / "report.json"
    resolve = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--quiet",
            "--ignore-installed",
            "--only-binary=:all:",
            "--python-version",
            python,
            *(f"--platform={p}" for p in platforms),
            "--target",
            str(tmp_path / "nowhere"),
            "--report",
            str(report),
            f"{root / path.lstrip('/')}[{extras}]",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert resolve.returncode == 0, resolve.stderr[-3000:]
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert "onnxruntime-gpu" in names and "onnxruntime" not in names, sorted(names)
    assert not names & {"torch", "transformers", "onnx"}, sorted(names)
