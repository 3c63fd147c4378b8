"""llama.cpp built from the llama-cpp-python sdist, and GGUF models made from the bench checkpoint.

The sdist on PyPI vendors llama.cpp with its `convert_hf_to_gguf.py` and gguf-py, so one download
from the index this project already uses gives the binaries and the converter. First use downloads
it, builds only `llama-bench`, `llama-batched-bench` and `llama-quantize` (static; 5 to 30 minutes on 2 cores here, by
load) into bench/.llamacpp, converts the checkpoint to GGUF f32 with this project's own interpreter
(torch, transformers, numpy and sentencepiece are already there; gguf-py comes from the sdist), and
quantizes that to Q8_0 and Q4_0. Anything that fails makes llama.cpp "unavailable" with the reason,
never the whole bench.

The build is portable (`GGML_NATIVE=OFF`) with the instruction sets this CPU reports turned on one by
one, and AMX always off: a native build on a CPU with AMX dies with SIGILL on quantized models.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from . import stamps

SDIST = "llama-cpp-python==0.3.36"
ROOT = Path("bench/.llamacpp")
MODELS = Path("bench/models/llamacpp")
TARGETS = ("llama-bench", "llama-batched-bench", "llama-quantize")
# The GGUF variants measured: the f32 conversion of the checkpoint, then llama-quantize's types.
VARIANTS = ("f32", "q8_0", "q4_0")
QUANT_TYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0"}

# ggml's x86 options and the /proc/cpuinfo flags each one needs; an option is on only where every
# flag is present, so the binary runs on this machine and never on a guess.
ISA_OPTIONS: dict[str, tuple[str, ...]] = {
    "GGML_SSE42": ("sse4_2",),
    "GGML_AVX": ("avx",),
    "GGML_AVX2": ("avx2",),
    "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",),
    "GGML_BMI2": ("bmi2",),
    "GGML_AVX_VNNI": ("avx_vnni",),
    # ggml's AVX512 option compiles with -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw.
    "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "GGML_AVX512_VBMI": ("avx512vbmi",),
    "GGML_AVX512_VNNI": ("avx512_vnni",),
    "GGML_AVX512_BF16": ("avx512_bf16",),
}
ALWAYS_OFF = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")  # SIGILL on quantized models, see above


@dataclass(frozen=True)
class LlamacppSetup:
    llama_bench: Path | None
    models: dict[str, Path] = field(default_factory=dict)  # variant -> GGUF file
    batched_bench: Path | None = None  # llama-batched-bench: parallel sequences, aggregate rates
    unavailable: str | None = None  # why llama.cpp cannot be measured here; None when it can
    built_s: float = 0.0  # time spent building or converting in this call (0 when all was there)


def cpu_flags(cpuinfo: str) -> set[str]:
    """The instruction-set flags of the first processor in /proc/cpuinfo's text."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def cmake_options(flags: set[str]) -> list[str]:
    """cmake -D options for a portable static build of the tools, for a CPU with these flags."""
    options = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DGGML_NATIVE=OFF",
        "-DGGML_CCACHE=OFF",
        "-DLLAMA_OPENSSL=OFF",  # no model downloads: the bench passes local files
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=OFF",  # its web UI would be fetched at configure time
        "-DLLAMA_BUILD_APP=OFF",
    ]
    options += [f"-D{name}={'ON' if set(needs) <= flags else 'OFF'}" for name, needs in ISA_OPTIONS.items()]
    options += [f"-D{name}=OFF" for name in ALWAYS_OFF]
    return options


def build_percent(line: str) -> int | None:
    """The percentage of a cmake build progress line (`[ 42%] Building CXX object ...`), else None."""
    match = re.match(r"\[\s*(\d{1,3})%\]", line)
    return int(match.group(1)) if match else None


def vendored_commit(changelog: str, version: str) -> str | None:
    """The llama.cpp commit a llama-cpp-python release vendors, from its CHANGELOG's section for it.

    The sdist has no git history, so without this llama-bench would report commit "unknown".
    """
    section = re.search(
        rf"^## \[{re.escape(version)}\]$(.*?)(?=^## \[|\Z)", changelog, re.MULTILINE | re.DOTALL
    )
    commit = re.search(r"llama\.cpp@([0-9a-f]{7,40})\b", section.group(1)) if section else None
    return commit.group(1) if commit else None


def ensure_llamacpp(repo: Path, checkpoint: Path, log_path: Path) -> LlamacppSetup:
    """Build llama.cpp and the GGUF models where missing or stale; report why not when that fails."""
    root, models = repo / ROOT, repo / MODELS
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpu_flags(cpuinfo.read_text(encoding="utf-8", errors="replace")) if cpuinfo.is_file() else set()
    options = cmake_options(flags)
    bin_dir = root / "bin"
    src = root / "src"
    started, built = time.perf_counter(), False
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a", encoding="utf-8") as log:
        try:
            want = stamps.digest("\n".join([SDIST, *TARGETS, *options]))
            if stamps.read(root) != want:
                _build(root, src, bin_dir, options, log)
                built = True
                stamps.write(root, want)
            weights = stamps.digest(stamps.files_fingerprint(checkpoint, "*.safetensors") + want)
            if stamps.read(models) != weights:
                _convert(src, bin_dir, checkpoint, models, log)
                built = True
                stamps.write(models, weights)
        except subprocess.CalledProcessError as exc:
            return _failed(exc.cmd, f"failed: {_last_line(log, log_path) or exc}", log_path)
        except subprocess.TimeoutExpired as exc:
            return _failed(exc.cmd, f"took over {exc.timeout:.0f} s", log_path)
        except (OSError, ValueError, tarfile.TarError) as exc:  # ValueError: not one archive downloaded
            return LlamacppSetup(None, unavailable=f"{exc} (log: {log_path})")
    return LlamacppSetup(
        bin_dir / "llama-bench",
        {v: models / f"bench-{v}.gguf" for v in VARIANTS},
        bin_dir / "llama-batched-bench",
        None,
        time.perf_counter() - started if built else 0.0,
    )


def _build(root: Path, src: Path, bin_dir: Path, options: list[str], log: TextIO) -> None:
    shutil.rmtree(root, ignore_errors=True)
    download = root / "download"
    download.mkdir(parents=True)
    say(f"downloading the {SDIST} sdist into {ROOT} (first run only; it vendors llama.cpp) ...")
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--timeout", "60", "--retries", "2"]
    _run([*pip, "--no-binary", ":all:", "--no-deps", SDIST, "-d", str(download)], log, 600)
    (archive,) = download.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        top = tar.getnames()[0].split("/")[0]
        tar.extractall(root, filter="data")
    (root / top / "vendor" / "llama.cpp").rename(src)
    changelog = (root / top / "CHANGELOG.md").read_text(encoding="utf-8", errors="replace")
    if commit := vendored_commit(changelog, SDIST.split("==")[1]):
        options = [*options, f"-DLLAMA_BUILD_COMMIT={commit}"]  # what llama-bench reports as build_commit
    shutil.rmtree(root / top)
    shutil.rmtree(download)

    build = root / "build"
    on = [o.removeprefix("-D").removesuffix("=ON") for o in options if o.endswith("=ON")]
    say(f"configuring llama.cpp: GGML_NATIVE=OFF, AMX off, on: {', '.join(on)}")
    _run(["cmake", "-S", str(src), "-B", str(build), *options], log, 300)
    jobs = os.cpu_count() or 2
    say(f"building {' and '.join(TARGETS)} with {jobs} jobs (5 to 30 min on 2 cores, by load) ...")
    # Niced: a one-time build should not slow whatever else the machine is doing.
    command = ["nice", "-n", "10", "cmake", "--build", str(build), "-j", str(jobs), "--target", *TARGETS]
    _run_with_progress(command, log, 3600)
    bin_dir.mkdir()
    for target in TARGETS:
        shutil.copy2(build / "bin" / target, bin_dir / target)
    shutil.rmtree(build)  # hundreds of MB of objects; the static binaries are all that is needed


def _convert(src: Path, bin_dir: Path, checkpoint: Path, models: Path, log: TextIO) -> None:
    shutil.rmtree(models, ignore_errors=True)
    models.mkdir(parents=True)
    f32 = models / "bench-f32.gguf"
    say(f"converting {checkpoint} to GGUF f32 with llama.cpp's convert_hf_to_gguf.py ...")
    convert = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(checkpoint)]
    _run([*convert, "--outtype", "f32", "--outfile", str(f32)], log, 600)
    for variant, quant_type in QUANT_TYPES.items():
        say(f"quantizing to {quant_type} with llama-quantize ...")
        out = models / f"bench-{variant}.gguf"
        _run([str(bin_dir / "llama-quantize"), str(f32), str(out), quant_type], log, 600)


def say(message: str) -> None:
    print(f"bench: llama.cpp: {message}", flush=True)


def _run(command: Sequence[str], log: TextIO, timeout_s: float) -> None:
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)


def _run_with_progress(command: Sequence[str], log: TextIO, timeout_s: float) -> None:
    """`_run`, printing a line each time the build passes another tenth of its steps."""
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    shown, started = 0, time.perf_counter()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            percent = build_percent(line)
            if percent is not None and percent // 10 > shown // 10:
                shown = percent
                say(f"build {percent}% ({time.perf_counter() - started:.0f} s)")
        proc.wait()
    finally:
        timer.cancel()
    log.flush()
    if proc.returncode != 0:
        if time.perf_counter() - started >= timeout_s:
            raise subprocess.TimeoutExpired(list(command), timeout_s)
        raise subprocess.CalledProcessError(proc.returncode, list(command))


def _failed(command: Sequence[str] | str, what: str, log_path: Path) -> LlamacppSetup:
    parts = [command] if isinstance(command, str) else list(command)
    if parts[0] == "nice":
        parts = parts[3:]  # name the command, not its niceness
    step = " ".join([Path(parts[0]).name, *parts[1:3]])
    return LlamacppSetup(None, unavailable=f"`{step} ...` {what} (log: {log_path})")


def _last_line(log: TextIO, log_path: Path) -> str | None:
    log.flush()
    lines = [
        line for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()
    ]
    return lines[-1].strip() if lines else None
