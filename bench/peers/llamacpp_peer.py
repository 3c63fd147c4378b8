"""llama.cpp's batch-1 decode rate, measured by its own `llama-bench` on GGUF files of the bench checkpoint.

One call runs one `llama-bench` process: load the GGUF file, fill the KV cache with `depth` tokens
(random ids, untimed), then time `new_tokens` one-token decode steps (`-p 0 -n NEW -d DEPTH -r 1`),
which is what the other peers' decode rate measures after a prompt of `depth` tokens. llama-bench
reports rates, not per-token times, so this peer has a decode rate and no time to first token. It is
its own process already, so unlike the Python peers it needs no worker: the runner calls it directly,
in the same rotation.

OpenMP's wait policy decides llama.cpp's speed here, and which one wins depends on the machine's
load. ggml splits each op statically between its threads and meets at a barrier after every op:
libgomp's default waiters spin first, passive ones sleep at once. When other processes share the two
cores a spinning thread takes the core its partner needs (at load average 8-13 on 2 cores, Q4_0
decoded 2-57 tok/s with libgomp's default and 63-421 with OMP_WAIT_POLICY=passive; ggml's own
threadpool, built without OpenMP, collapsed the same way: 4-9); on an idle machine sleeping at
hundreds of barriers a token costs time instead. So by default (`auto`) the run measures both at its
start and gives llama.cpp the faster for the whole run (`choose_omp_wait`), as the other peers get
their own best settings; `--llamacpp-omp-wait passive|default` fixes one.
"""

from __future__ import annotations

import json
import statistics
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .client import thread_env


class LlamaBenchError(RuntimeError):
    """llama-bench failed, or printed no test of the shape that was asked for."""


@dataclass(frozen=True)
class LlamaBenchTest:
    """One test line of `llama-bench -o jsonl`."""

    n_prompt: int
    n_gen: int
    n_depth: int
    n_threads: int
    samples_ts: tuple[float, ...]  # tokens/s of each repetition
    model_type: str  # e.g. "llama 8B F32": llama.cpp's name for the architecture and weight type
    model_size: int  # bytes of all weight tensors in the file
    build_commit: str
    flash_attn: int  # -1 auto, 0 off, 1 on


def parse_llama_bench_jsonl(text: str) -> list[LlamaBenchTest]:
    """The tests of `llama-bench -o jsonl` output: one JSON object per line; other lines are skipped."""
    tests = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        record: dict[str, Any] = json.loads(line)
        tests.append(
            LlamaBenchTest(
                n_prompt=int(record["n_prompt"]),
                n_gen=int(record["n_gen"]),
                n_depth=int(record["n_depth"]),
                n_threads=int(record["n_threads"]),
                samples_ts=tuple(float(x) for x in record["samples_ts"]),
                model_type=str(record["model_type"]),
                model_size=int(record["model_size"]),
                build_commit=str(record["build_commit"]),
                flash_attn=int(record.get("flash_attn", -1)),
            )
        )
    return tests


def decode_rate(tests: list[LlamaBenchTest], depth: int, new_tokens: int, threads: int) -> float:
    """The decode tok/s of the one generation test at this depth, checked against what was asked for."""
    matching = [t for t in tests if (t.n_prompt, t.n_gen, t.n_depth) == (0, new_tokens, depth)]
    if len(matching) != 1:
        raise LlamaBenchError(
            f"expected one test with n_prompt 0, n_gen {new_tokens}, n_depth {depth}; got {len(matching)} "
            f"of {len(tests)}"
        )
    test = matching[0]
    if test.n_threads != threads:
        raise LlamaBenchError(f"llama-bench ran {test.n_threads} threads, asked for {threads}")
    if len(test.samples_ts) != 1:
        raise LlamaBenchError(f"expected one repetition, got {len(test.samples_ts)}")
    return test.samples_ts[0]


def parallel_decode_rate(text: str, prompt: int, new_tokens: int, parallel: int, threads: int) -> float:
    """The aggregate decode tok/s (`speed_tg`: parallel * new_tokens over the decode time, prefill
    excluded) of the one `llama-batched-bench --output-format jsonl` result of this shape."""
    results = [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]
    matching = [r for r in results if (r["pp"], r["tg"], r["pl"]) == (prompt, new_tokens, parallel)]
    if len(matching) != 1:
        raise LlamaBenchError(
            f"expected one llama-batched-bench result with pp {prompt}, tg {new_tokens}, pl {parallel}; "
            f"got {len(matching)} of {len(results)}"
        )
    if int(matching[0]["n_threads"]) != threads:
        raise LlamaBenchError(
            f"llama-batched-bench ran {matching[0]['n_threads']} threads, asked for {threads}"
        )
    return float(matching[0]["speed_tg"])


class LlamacppPeer:
    def __init__(
        self,
        llama_bench: Path,
        models: Mapping[str, Path],
        threads: int,
        repo: Path,
        omp_wait: str = "auto",
        batched_bench: Path | None = None,
    ) -> None:
        self.llama_bench = llama_bench
        self.batched_bench = batched_bench
        self.models = dict(models)
        self.threads = threads
        self.repo = repo
        self.env = thread_env(threads, repo)
        self._set_omp_wait("passive" if omp_wait == "auto" else omp_wait)  # auto: until choose_omp_wait
        self.omp_wait_probe: dict[str, float] = {}  # policy -> decode tok/s, when chosen by a probe
        self.last: dict[str, LlamaBenchTest] = {}  # variant -> its latest test, for info()

    def _set_omp_wait(self, policy: str) -> None:
        self.omp_wait = policy
        self.env.pop("OMP_WAIT_POLICY", None)
        if policy != "default":
            self.env["OMP_WAIT_POLICY"] = policy

    def choose_omp_wait(self, variant: str, rounds: int = 3) -> str:
        """Measure `variant`'s decode under each wait policy, alternating, and keep the faster (the
        median of `rounds` each) for every later call; returns it. A failed probe leaves passive."""
        rates: dict[str, list[float]] = {"passive": [], "default": []}
        try:
            for _ in range(rounds):
                for policy, measured in rates.items():
                    self._set_omp_wait(policy)
                    measured.append(self.decode_tok_s(variant, 128, 32))
        except LlamaBenchError:
            self._set_omp_wait("passive")
            raise
        self.omp_wait_probe = {policy: statistics.median(measured) for policy, measured in rates.items()}
        self._set_omp_wait(max(self.omp_wait_probe, key=self.omp_wait_probe.__getitem__))
        return self.omp_wait

    def decode_tok_s(self, variant: str, depth: int, new_tokens: int, timeout_s: float = 600) -> float:
        """Decode tokens/s of `new_tokens` steps after `depth` tokens of context, one repetition."""
        command = [
            str(self.llama_bench),
            "-m",
            str(self.models[variant]),
            "-p",
            "0",
            "-n",
            str(new_tokens),
            "-d",
            str(depth),
            "-r",
            "1",
            "-t",
            str(self.threads),
            "-o",
            "jsonl",
        ]
        done = self._run(command, f"llama-bench {variant}", timeout_s)
        tests = parse_llama_bench_jsonl(done.stdout)
        rate = decode_rate(tests, depth, new_tokens, self.threads)
        self.last[variant] = next(t for t in tests if t.n_depth == depth and t.n_gen == new_tokens)
        return rate

    def parallel_decode_tok_s(
        self, variant: str, prompt: int, new_tokens: int, parallel: int, timeout_s: float = 600
    ) -> float:
        """Aggregate decode tokens/s of `parallel` sequences decoded together (llama-batched-bench:
        `prompt` random tokens each, prefilled, then `new_tokens` steps of one token per sequence)."""
        if self.batched_bench is None:
            raise LlamaBenchError("llama-batched-bench was not built")
        command = [
            str(self.batched_bench),
            "-m",
            str(self.models[variant]),
            "-c",
            str(parallel * (prompt + new_tokens)),
            "-b",
            "2048",
            "-ub",
            "512",
            "-npp",
            str(prompt),
            "-ntg",
            str(new_tokens),
            "-npl",
            str(parallel),
            "-t",
            str(self.threads),
            "-tb",
            str(self.threads),
            "--output-format",
            "jsonl",
        ]
        done = self._run(command, f"llama-batched-bench {variant}", timeout_s)
        # It logs its results with the rest of its output: read both streams.
        return parallel_decode_rate(
            done.stdout + "\n" + done.stderr, prompt, new_tokens, parallel, self.threads
        )

    def _run(self, command: list[str], what: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, env=self.env, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise LlamaBenchError(f"{what} took over {timeout_s:.0f} s") from exc
        if done.returncode != 0:
            # A negative code is a signal: -4 is SIGILL, an instruction this CPU lacks.
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            raise LlamaBenchError(f"{what} exited with {done.returncode}: {tail}")
        return done

    def info(self, variant: str) -> dict[str, Any]:
        test = self.last.get(variant)
        return {
            "llama_bench": _shown(self.llama_bench, self.repo),
            "model": _shown(self.models[variant], self.repo),
            "threads": self.threads,
            "omp_wait_policy": self.omp_wait,
            **({"omp_wait_probe_tok_s": self.omp_wait_probe} if self.omp_wait_probe else {}),
            **(
                {
                    "model_type": test.model_type,
                    "model_size_bytes": test.model_size,
                    "build_commit": test.build_commit,
                    "flash_attn": {-1: "auto", 0: "off", 1: "on"}.get(test.flash_attn, test.flash_attn),
                }
                if test
                else {}
            ),
        }


def _shown(path: Path, repo: Path) -> str:
    """A path relative to the repository where it lies inside: results files do not name the checkout."""
    return str(path.relative_to(repo)) if path.is_relative_to(repo) else str(path)
