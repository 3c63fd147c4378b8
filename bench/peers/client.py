"""The orchestrator's handle on one worker process (see `worker` for the protocol)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class WorkerError(RuntimeError):
    """The worker failed to start or a request failed; the message carries its traceback or log tail."""


def thread_env(threads: int, repo: Path, source_paths: Sequence[Path] = ()) -> dict[str, str]:
    """Every library's pool pinned to the same size, so no peer gets more cores than another.
    `source_paths` go on PYTHONPATH after the repository, ahead of the installed packages: how the
    engine before v2 (bench/variants.py) runs from its own source tree in this virtualenv."""
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    env["OPENBLAS_NUM_THREADS"] = "1"  # numpy only picks argmax in the workers; no BLAS pool spinning
    paths = (str(repo), *map(str, source_paths), env.get("PYTHONPATH", ""))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


class Worker:
    def __init__(
        self,
        name: str,
        python: Path,
        model_dir: Path,
        threads: int,
        repo: Path,
        log_path: Path,
        start_timeout_s: float = 300,
        provider: str = "cpu",
        lora_dir: Path | None = None,
        peer: str | None = None,
        source_paths: Sequence[Path] = (),
    ) -> None:
        """`name` labels the results; `peer` (default: the name) is the kind the worker runs."""
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("w", encoding="utf-8")
        self._proc = subprocess.Popen(
            [
                str(python),
                "-m",
                "bench.peers.worker",
                "--peer",
                peer or name,
                "--model-dir",
                str(model_dir),
                "--threads",
                str(threads),
                "--provider",
                provider,
                *(["--lora-dir", str(lora_dir)] if lora_dir is not None else []),
            ],
            cwd=repo,
            env=thread_env(threads, repo, source_paths),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
        )
        first = self._read(start_timeout_s)
        if "ready" not in first:
            tail = self._log_tail()
            self.close()
            raise WorkerError(f"{name} worker did not start: {first.get('error', '')}{tail}")
        self.info: dict[str, Any] = first["ready"]

    def call(self, op: str, timeout_s: float = 600, **args: Any) -> Any:
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self._proc.stdin.flush()
        reply = self._read(timeout_s)
        if "error" in reply:
            raise WorkerError(f"{self.name} {op} failed:\n{reply['error']}")
        return reply["ok"]

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self._proc.stdin.close()
                self._proc.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._log.close()

    def _read(self, timeout_s: float) -> dict[str, Any]:
        assert self._proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._proc.kill()
                raise WorkerError(f"{self.name} worker gave no answer in {timeout_s:.0f} s{self._log_tail()}")
            ready, _, _ = select.select([self._proc.stdout], [], [], min(left, 1.0))
            if ready:
                line = self._proc.stdout.readline()
                if not line:
                    self._proc.wait()
                    raise WorkerError(
                        f"{self.name} worker exited with {self._proc.returncode}{self._log_tail()}"
                    )
                message: dict[str, Any] = json.loads(line)
                return message

    def _log_tail(self, lines: int = 15) -> str:
        if not self._log.closed:
            self._log.flush()
        text = self.log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        return ("\n  log " + str(self.log_path) + ":\n  " + "\n  ".join(text[-lines:])) if text else ""
