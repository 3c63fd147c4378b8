"""One benchmark run: set up, measure every peer interleaved, and collect the raw timings.

Order of work: build what is missing (bench model and its int4/int8 exports, genai virtualenv and
models, llama.cpp and its GGUF files, the engine before v2 and its export), read bandwidth, start one
worker per peer, warm each up, then the batch-1 cases (peers rotated every repetition, so no peer
always runs right after the same neighbour), the concurrency sweep (levels rotated the same way, today's
server and the one before v2 back to back at each), fp32 vs int4 vs int8 streams, mixed prompt
lengths all at once vs one by one, running streams under long-prompt arrivals, the same streams with
and without a JSON schema on every row (the two back to back, order rotated), LoRA, and bandwidth once
more: the machine is shared, and two readings show how much it drifted. llama.cpp runs in the same
rotation as one `llama-bench` process per call.
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from . import stamps
from .config import BenchConfig, Case
from .genai_env import GenaiSetup, ensure_genai
from .llamacpp_env import VARIANTS, LlamacppSetup, ensure_llamacpp
from .membw import read_bandwidth
from .peers.client import Worker, WorkerError
from .peers.llamacpp_peer import LlamaBenchError, LlamacppPeer
from .prompts import BOS_ID, digits_of_length, prompt_ids, text_of_length, vocabulary_words, words_prompt
from .variants import BeforeSetup, ensure_before, ensure_quantized

BENCH_MODEL = Path("models/bench")
SETTLE_S = 0.1  # between runs: lets the previous peer's spinning thread pool go idle
# Time kept back while batch-1 repetitions run: one sweep repetition (~40 s quiet, twice that under load)
# and the closing bandwidth reading. Repetitions past the budget are skipped, never the first.
SWEEP_RESERVE_S = 100.0
# Kept back while the sweep runs: the LoRA section's set-up (a first run exports models/bench-lora) and
# one repetition of its three configurations.
LORA_RESERVE_S = 90.0
T = TypeVar("T")
# One peer per GGUF variant, all driven by the same llama-bench binary.
LLAMACPP_PEERS = {f"llamacpp-{variant}": variant for variant in VARIANTS}
# In-process peers of the batch-1 cases, in rotation order; each runs where its worker started.
BATCH1_PEERS = (
    "engine",
    "engine-int4",
    "engine-int4-head4",
    "engine-int8",
    "transformers",
    "genai",
    "genai-int4",
)
# Servers driven through gRPC: today's (fp32, int4, int4 with a 4-bit LM head, int8) and the engine
# before v2 (fp32).
SERVERS = ("grpc", "grpc-int4", "grpc-int4-head4", "grpc-int8", "grpc-before")
# The two engines the before/after sections set side by side, both fp32.
BEFORE_AFTER = ("grpc", "grpc-before")


def _records(name: dict[str, Any]) -> dict[str, Any]:
    """A long list of records: a string, a number, an integer and enums. minItems keeps the JSON from
    completing within the case's new tokens, so every mode generates exactly as many."""
    record = {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 100000},
            "name": name,
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        },
        "required": ["id", "name", "score", "tags"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"records": {"type": "array", "minItems": 64, "items": record}},
        "required": ["records"],
        "additionalProperties": False,
    }


# The constrained-decoding case's schemas. Masks inside a free-form string are llguidance's fast path
# (a precomputed slice of the vocabulary); a string with maxLength is its slow one (about 0.17 ms a
# row here): the two bracket what a schema costs.
GRAMMAR_SCHEMAS: dict[str, dict[str, Any]] = {
    "free strings": _records({"type": "string"}),
    "bounded strings": _records({"type": "string", "maxLength": 16}),
}
GRAMMAR_MODES = ("none", *GRAMMAR_SCHEMAS)


@dataclass
class RawResults:
    """Timings as measured; `report` turns them into medians, percentiles and ratios."""

    config: BenchConfig
    machine: dict[str, Any]
    weights: dict[str, Any]
    bandwidth: dict[int, list[float]] = field(default_factory=dict)  # threads -> bytes/s samples
    peer_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # peer -> why it was not measured
    # "prompt/new" -> peer -> one [start, token_1..token_n] list per repetition
    batch1: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)
    # "prompt/new" -> peer -> one decode tok/s per repetition, from peers that report rates, not
    # token times (llama-bench)
    decode_rates: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # concurrency -> one list of stream records per repetition
    sweep: dict[int, list[list[dict[str, Any]]]] = field(default_factory=dict)
    # the same for the engine before v2
    sweep_before: dict[int, list[list[dict[str, Any]]]] = field(default_factory=dict)
    # "grpc", "grpc-int4", "grpc-int8" -> one list of stream records per repetition (quantized_streams)
    dtype_streams: dict[str, list[list[dict[str, Any]]]] = field(default_factory=dict)
    # the peers beside them at as many sequences: genai (one static batch) and llama.cpp
    # (llama-batched-bench) -> one aggregate decode tok/s per repetition
    parallel_rates: dict[str, list[float]] = field(default_factory=dict)
    # server -> "concurrent" | "sequential" -> one list of stream records per repetition
    mixed: dict[str, dict[str, list[list[dict[str, Any]]]]] = field(default_factory=dict)
    # server -> one {"streams": [...], "long": [{"sent", "ended"}]} per repetition
    arrivals: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # concurrency -> "none" or a GRAMMAR_SCHEMAS name -> one list of stream records per repetition
    grammar: dict[int, dict[str, list[list[dict[str, Any]]]]] = field(default_factory=dict)
    # LoRA configuration (bench/lora.py) -> one list of stream records per repetition
    lora: dict[str, list[list[dict[str, Any]]]] = field(default_factory=dict)
    gpu: dict[str, Any] = field(default_factory=dict)
    # bench.beyond_llc's summary of its rounds, or {"skipped": why}
    beyond_llc: dict[str, Any] = field(default_factory=dict)
    cut_short: dict[str, str] = field(default_factory=dict)  # what ran fewer repetitions, and why
    load: dict[str, float] = field(default_factory=dict)  # 1-minute load average as each phase began
    setup_s: float = 0.0
    wall_s: float = 0.0


def case_key(case: Case) -> str:
    return f"{case.prompt_tokens}/{case.new_tokens}"


def rotated(items: Sequence[T], by: int) -> list[T]:
    """`items` starting at position `by` (mod length): repetition r runs peer r first."""
    if not items:
        return []
    k = by % len(items)
    return [*items[k:], *items[:k]]


def ensure_bench_model(repo: Path) -> Path:
    """Build models/bench when it is missing, when this engine cannot load it (an older export), or
    when the exporter changed since it was built (the graph measured must be the one it writes now;
    the rebuilt checkpoint is the same bytes, so the peers' models made from it stay)."""
    model_dir = repo / BENCH_MODEL
    exporter = stamps.exporter_digest(repo)
    why = "missing"
    if (model_dir / "textgen.json").is_file() and (model_dir / "checkpoint").is_dir():
        from textgen_server.engine import Engine

        try:
            Engine(model_dir, provider="cpu", threads=1)
            if stamps.read(model_dir) == exporter:
                return model_dir
            why = "made by other exporter code"
        except Exception as exc:  # noqa: BLE001 - any load failure: ORT's own error types, a stale config
            why = f"not loadable by this engine ({type(exc).__name__})"
    log(f"building the bench model in {BENCH_MODEL}: {why} (about 40 s)")
    from textgen_export.demo import build_demo

    build_demo(model_dir, size="bench", overwrite=True)
    stamps.write(model_dir, exporter)
    return model_dir


_T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"bench: [{time.perf_counter() - _T0:4.0f} s] {message}", flush=True)


class Runner:
    def __init__(self, config: BenchConfig, repo: Path, logs: Path, budget_s: float) -> None:
        self.config = config
        self.repo = repo
        self.logs = logs
        self.workers: dict[str, Worker] = {}
        self.llamacpp: LlamacppPeer | None = None
        self.llamacpp_peers: list[str] = []  # the variants still measured (one may fail alone)
        self.deadline = time.perf_counter() + budget_s

    def _repetitions(self, raw: RawResults, what: str, reps: int, reserve_s: float) -> Iterator[int]:
        """0 .. reps-1, until the budget minus `reserve_s` is spent (the cut is recorded); the first
        repetition always runs."""
        for rep in range(reps):
            if rep > 0 and time.perf_counter() + reserve_s >= self.deadline:
                raw.cut_short[what] = f"{rep} of {reps} repetitions: the time budget ran out"
                log(f"{what}: stopping after {rep} of {reps} repetitions (time budget)")
                return
            yield rep

    def run(self) -> RawResults:
        from .machine import machine_info
        from .roofline import read_checkpoint_tensors, weight_traffic

        started = time.perf_counter()
        c = self.config
        model_dir = ensure_bench_model(self.repo)
        genai = (
            ensure_genai(self.repo, model_dir / "checkpoint", self.logs / "genai-setup.log")
            if "genai" in c.peers
            else GenaiSetup(None, {}, "left out (--no-genai)")
        )
        llamacpp = (
            ensure_llamacpp(self.repo, model_dir / "checkpoint", self.logs / "llamacpp-setup.log")
            if "llamacpp" in c.peers
            else LlamacppSetup(None, unavailable="left out (--no-llamacpp)")
        )
        before = (
            ensure_before(self.repo, model_dir / "checkpoint", self.logs / "before-setup.log")
            if "before" in c.peers
            else BeforeSetup((), None, "left out (--no-before)")
        )
        quantized = (
            {variant: ensure_quantized(self.repo, model_dir, variant) for variant in c.quantized}
            if c.only is None
            else {}
        )
        # A one-time build (minutes) is not measuring time, which is what the budget is for.
        self.deadline += llamacpp.built_s
        raw = RawResults(
            config=c,
            machine=machine_info(c.threads),
            weights=weight_traffic(read_checkpoint_tensors(model_dir / "checkpoint")).to_dict(),
        )
        if genai.unavailable:
            raw.unavailable["genai"] = genai.unavailable
        if llamacpp.unavailable:
            raw.unavailable["llamacpp"] = llamacpp.unavailable
        if before.unavailable:
            raw.unavailable["grpc-before"] = before.unavailable
        raw.setup_s = time.perf_counter() - started
        try:
            if c.only is None:
                self._read_bandwidth(raw)
                self._start_workers(raw, model_dir, genai, quantized, before)
                self._start_llamacpp(llamacpp)
                self._warm_up(raw)
                for case in c.cases:
                    self._batch1(raw, case, model_dir)
                self._sweep(raw, model_dir)
                self._dtype_streams(raw)
                self._mixed(raw)
                self._arrivals(raw)
            elif c.only == "constrained":
                self._start_workers(raw, model_dir, genai, quantized, before, names=("grpc",))
                self._warm_up(raw)
            if c.only in (None, "constrained"):
                self._grammar(raw)
            if c.only in (None, "lora"):
                self._lora(raw, model_dir)
            if c.only is None:
                self._read_bandwidth(raw)
        finally:
            for worker in self.workers.values():
                worker.close()
        if c.only is None:
            self._beyond_llc(raw)  # alone on the machine: the other workers have ended
        from .gpu import gpu_section

        raw.gpu = {"skipped": f"--only {c.only}"} if c.only else gpu_section(self.repo, c.threads)
        raw.machine["load_average_at_end"] = list(os.getloadavg())
        raw.wall_s = time.perf_counter() - started
        return raw

    # -- steps ---------------------------------------------------------------------------------------

    def _read_bandwidth(self, raw: RawResults) -> None:
        c = self.config
        for threads in sorted({1, c.threads}):
            log(f"memory read bandwidth, {threads} thread(s)")
            raw.bandwidth.setdefault(threads, []).extend(
                read_bandwidth(threads, c.bandwidth_bytes, c.bandwidth_reps)
            )

    def _start_workers(
        self,
        raw: RawResults,
        model_dir: Path,
        genai: GenaiSetup,
        quantized: dict[str, Path],
        before: BeforeSetup,
        names: tuple[str, ...] | None = None,
    ) -> None:
        """The in-process and gRPC workers (only those in `names`, when given)."""
        c = self.config
        here = Path(sys.executable)
        # name, peer kind, python, model folder, source paths
        wanted: list[tuple[str, str, Path, Path, tuple[Path, ...]]] = [
            ("engine", "engine", here, model_dir, ())
        ]
        wanted += [(f"engine-{dtype}", "engine", here, folder, ()) for dtype, folder in quantized.items()]
        if "transformers" in c.peers:
            wanted.append(("transformers", "transformers", here, model_dir, ()))
        if genai.python is not None:
            for precision, folder in genai.model_dirs.items():
                name = "genai" if precision == "fp32" else f"genai-{precision}"
                wanted.append((name, "genai", genai.python, folder, ()))
        wanted.append(("grpc", "grpc", here, model_dir, ()))
        wanted += [(f"grpc-{dtype}", "grpc", here, folder, ()) for dtype, folder in quantized.items()]
        if before.model_dir is not None:
            wanted.append(("grpc-before", "grpc", here, before.model_dir, before.source_paths))
        for name, peer, python, directory, source_paths in wanted:
            if names is not None and name not in names:
                continue
            log(f"starting the {name} worker")
            try:
                worker = Worker(
                    name,
                    python,
                    directory,
                    c.threads,
                    self.repo,
                    self.logs / f"{name}.log",
                    peer=peer,
                    source_paths=source_paths,
                )
            except WorkerError as exc:
                if name == "engine":
                    raise
                raw.unavailable[name] = _first_lines(str(exc))
                log(f"{name} unavailable: {raw.unavailable[name]}")
                continue
            self.workers[name] = worker
            raw.peer_info[name] = worker.info
        if "genai" in raw.peer_info:
            raw.machine["versions"]["onnxruntime_genai"] = raw.peer_info["genai"].get("onnxruntime_genai")

    def _start_llamacpp(self, setup: LlamacppSetup) -> None:
        if setup.llama_bench is None:
            return
        self.llamacpp = LlamacppPeer(
            setup.llama_bench,
            setup.models,
            self.config.threads,
            self.repo,
            self.config.llamacpp_omp_wait,
            batched_bench=setup.batched_bench,
        )
        self.llamacpp_peers = list(LLAMACPP_PEERS)

    def _warm_up(self, raw: RawResults) -> None:
        """First runs pay for allocation and graph caches; each shape once, not counted."""
        c = self.config
        if self.llamacpp is not None and c.llamacpp_omp_wait == "auto" and self.llamacpp_peers:
            variant = LLAMACPP_PEERS[self.llamacpp_peers[0]]
            log(f"choosing llama.cpp's OpenMP wait policy on {variant}")
            try:
                log(f"llama.cpp runs with OMP_WAIT_POLICY {self.llamacpp.choose_omp_wait(variant)}")
            except LlamaBenchError as exc:
                log(f"llama.cpp's wait policy probe failed, passive it is: {exc}")
        for name in list(self.llamacpp_peers):  # also reads each GGUF file into the page cache
            log(f"warming up {name}")
            try:
                self._llamacpp_rate(name, 128, 8)
                assert self.llamacpp is not None
                raw.peer_info[name] = self.llamacpp.info(LLAMACPP_PEERS[name])
            except LlamaBenchError as exc:
                self._drop_llamacpp(raw, name, exc)
        rng = random.Random(c.seed - 1)
        longest = max(case.prompt_tokens for case in c.cases)
        for name in list(self.workers):
            log(f"warming up {name}")
            try:
                if name in SERVERS:
                    texts = self._texts(rng, c.sweep_prompt_tokens, max(c.concurrency))
                    self.workers[name].call("streams", prompts=texts[:1], new_tokens=8)
                    self.workers[name].call("streams", prompts=texts, new_tokens=2)
                    if name != "grpc":
                        continue
                    for schema in GRAMMAR_SCHEMAS.values():  # the grammar's thread pools and compiles
                        self.workers[name].call(
                            "streams", prompts=texts[:16], new_tokens=8, json_schema=schema
                        )
                else:
                    self.workers[name].call("generate", prompt_ids=prompt_ids(128, rng), new_tokens=8)
                    self.workers[name].call("generate", prompt_ids=prompt_ids(longest, rng), new_tokens=2)
            except WorkerError as exc:
                self._drop(raw, name, exc)

    def _batch1(self, raw: RawResults, case: Case, model_dir: Path) -> None:
        """One prompt per repetition, the same for all peers; gRPC joins where the prompt is short enough."""
        c = self.config
        key = case_key(case)
        raw.load[f"batch-1 {key}"] = os.getloadavg()[0]
        rng = random.Random(f"{c.seed}-{key}")
        with_grpc = case.prompt_tokens == c.sweep_prompt_tokens
        peers = [
            p
            for p in (*BATCH1_PEERS, *BEFORE_AFTER)
            if p in self.workers and (p not in BEFORE_AFTER or with_grpc)
        ] + self.llamacpp_peers
        results = raw.batch1.setdefault(key, {p: [] for p in peers if p not in LLAMACPP_PEERS})
        rates = raw.decode_rates.setdefault(key, {p: [] for p in peers if p in LLAMACPP_PEERS})
        for rep in self._repetitions(raw, f"batch-1 {key}", case.reps, SWEEP_RESERVE_S + LORA_RESERVE_S):
            if with_grpc:  # text for the server; its exact ids for the in-process peers
                text = self._texts(rng, case.prompt_tokens, 1)[0]
                ids = [BOS_ID, *self._tokenizer(model_dir).encode(text)]
            else:
                text, ids = "", prompt_ids(case.prompt_tokens, rng)
            for name in rotated(peers, rep):
                if name not in self.workers and name not in self.llamacpp_peers:
                    continue  # dropped after a failure
                log(f"prompt {case.prompt_tokens}, {case.new_tokens} new: rep {rep + 1}/{case.reps} {name}")
                if name in LLAMACPP_PEERS:
                    try:  # llama-bench fills the context with random ids: the prompt's length is what counts
                        rates[name].append(self._llamacpp_rate(name, case.prompt_tokens, case.new_tokens))
                    except LlamaBenchError as exc:
                        self._drop_llamacpp(raw, name, exc)
                    time.sleep(SETTLE_S)
                    continue
                if name in BEFORE_AFTER:
                    times = self._call(raw, name, "generate_text", prompt=text, new_tokens=case.new_tokens)
                else:
                    times = self._call(raw, name, "generate", prompt_ids=ids, new_tokens=case.new_tokens)
                if times is None:
                    continue
                results[name].append(times)
                time.sleep(SETTLE_S)

    def _sweep(self, raw: RawResults, model_dir: Path) -> None:
        """Each level on today's server and, back to back on the same prompts, the one before v2."""
        c = self.config
        if "grpc" not in self.workers:
            return
        raw.load["concurrency sweep"] = os.getloadavg()[0]
        rng = random.Random(f"{c.seed}-sweep")
        for rep in self._repetitions(raw, "concurrency sweep", c.sweep_reps, LORA_RESERVE_S):
            texts = self._texts(rng, c.sweep_prompt_tokens, max(c.concurrency))
            for level in rotated(list(c.concurrency), rep):
                for name in rotated(self._present(BEFORE_AFTER), rep):
                    log(f"sweep rep {rep + 1}/{c.sweep_reps}: {level} concurrent streams, {name}")
                    streams = self._call(
                        raw, name, "streams", prompts=texts[:level], new_tokens=c.sweep_new_tokens
                    )
                    if streams is not None:
                        target = raw.sweep if name == "grpc" else raw.sweep_before
                        target.setdefault(level, []).append(streams)
                    time.sleep(SETTLE_S)

    def _dtype_streams(self, raw: RawResults) -> None:
        """fp32, int4 and int8 servers on the same streams, and the peers at as many sequences: genai
        as one static batch, llama.cpp's variants with llama-batched-bench; the order rotated."""
        c = self.config
        servers = self._present(("grpc", *(f"grpc-{dtype}" for dtype in c.quantized)))
        genai = self._present(("genai", "genai-int4"))
        llamacpp = list(self.llamacpp_peers) if self.llamacpp and self.llamacpp.batched_bench else []
        if len(servers) < 2:
            return
        raw.load["quantized streams"] = os.getloadavg()[0]
        rng = random.Random(f"{c.seed}-dtypes")
        n = c.quantized_streams
        for rep in self._repetitions(raw, "quantized streams", c.quantized_reps, LORA_RESERVE_S):
            texts = self._texts(rng, c.sweep_prompt_tokens, n)
            ids = [prompt_ids(c.sweep_prompt_tokens, rng) for _ in range(n)]
            for name in rotated([*servers, *genai, *llamacpp], rep):
                log(f"quantized rep {rep + 1}/{c.quantized_reps}: {n} streams, {name}")
                if name in servers:
                    streams = self._call(raw, name, "streams", prompts=texts, new_tokens=c.sweep_new_tokens)
                    if streams is not None:
                        raw.dtype_streams.setdefault(name, []).append(streams)
                elif name in genai:
                    times = self._call(
                        raw, name, "generate_batch", prompts=ids, new_tokens=c.sweep_new_tokens
                    )
                    if times is not None:  # every row gets a token per step; the first step is prefill's
                        rate = n * (len(times) - 2) / (times[-1] - times[1])
                        raw.parallel_rates.setdefault(name, []).append(rate)
                else:
                    assert self.llamacpp is not None
                    try:
                        rate = self.llamacpp.parallel_decode_tok_s(
                            LLAMACPP_PEERS[name], c.sweep_prompt_tokens, c.sweep_new_tokens, n
                        )
                        raw.parallel_rates.setdefault(name, []).append(rate)
                    except LlamaBenchError as exc:
                        raw.unavailable[f"{name} parallel"] = _first_lines(str(exc))
                        llamacpp.remove(name)
                time.sleep(SETTLE_S)

    def _mixed(self, raw: RawResults) -> None:
        """Requests of 1 to mixed_max_words words: all at once, then the same one after another (the order
        of the two and of the servers rotated)."""
        c = self.config
        raw.load["mixed lengths"] = os.getloadavg()[0]
        rng = random.Random(f"{c.seed}-mixed")
        for rep in self._repetitions(raw, "mixed lengths", c.mixed_reps, LORA_RESERVE_S):
            prompts = [
                words_prompt(rng.randint(1, c.mixed_max_words), rng, self._vocab())
                for _ in range(c.mixed_requests)
            ]
            for name in rotated(self._present(BEFORE_AFTER), rep):
                for how in rotated(("concurrent", "sequential"), rep):
                    log(
                        f"mixed lengths rep {rep + 1}/{c.mixed_reps}: {c.mixed_requests} requests {how}, {name}"
                    )
                    op = "streams" if how == "concurrent" else "one_by_one"
                    streams = self._call(raw, name, op, prompts=prompts, new_tokens=c.mixed_new_tokens)
                    if streams is not None:
                        raw.mixed.setdefault(name, {}).setdefault(how, []).append(streams)
                    time.sleep(SETTLE_S)

    def _arrivals(self, raw: RawResults) -> None:
        """arrival_streams running streams while arrival_prompt_tokens-token prompts keep arriving."""
        c = self.config
        raw.load["long-prompt arrivals"] = os.getloadavg()[0]
        rng = random.Random(f"{c.seed}-arrivals")
        for rep in self._repetitions(raw, "long-prompt arrivals", c.arrival_reps, LORA_RESERVE_S):
            texts = self._texts(rng, c.sweep_prompt_tokens, c.arrival_streams)
            # Digits: random text of 3000 tokens would pass the card's 6,144-character limit on `prompt`.
            long_prompt = digits_of_length(
                c.arrival_prompt_tokens - 1, self._tokenizer(self.repo / BENCH_MODEL).encode, rng
            )
            for name in rotated(self._present(BEFORE_AFTER), rep):
                log(f"arrivals rep {rep + 1}/{c.arrival_reps}: {c.arrival_streams} streams, {name}")
                result = self._call(
                    raw,
                    name,
                    "arrivals",
                    prompts=texts,
                    new_tokens=c.arrival_new_tokens,
                    long_prompt=long_prompt,
                )
                if result is not None:
                    raw.arrivals.setdefault(name, []).append(result)
                time.sleep(SETTLE_S)

    def _beyond_llc(self, raw: RawResults) -> None:
        """Batch-1 decode against the memory roofline on a model several times the LLC, where the
        bench model's weights sit in the LLC (bench/beyond_llc.py); otherwise the roofline row of the
        bench model itself is the measurement."""
        from .beyond_llc import graph_bytes_per_token, layers_for, one_round, summarize
        from .prefill_passes import ensure_model
        from .roofline import roofline_applies

        c = self.config
        llc = raw.machine.get("last_level_cache")
        if c.beyond_llc_rounds < 1:
            raw.beyond_llc = {"skipped": "left out (--no-beyond-llc, or a quick run)"}
            return
        if not llc or roofline_applies(int(raw.weights["bytes_per_token"]), int(llc["size_bytes"])):
            raw.beyond_llc = {"skipped": "the bench model's own roofline row applies"}
            return
        llc_bytes = int(llc["size_bytes"])
        raw.load["beyond the LLC"] = os.getloadavg()[0]
        try:
            model = ensure_model(layers_for(llc_bytes, "fp32"), "fp32")
            bytes_per_token = graph_bytes_per_token(model / "model.onnx")
            log(f"memory roofline beyond the LLC: {model.name}, {bytes_per_token / 1e9:.2f} GB a token")
            engine = Worker(
                "engine",
                Path(sys.executable),
                model,
                c.threads,
                self.repo,
                self.logs / "engine-beyond-llc.log",
            )
        except (OSError, WorkerError) as exc:  # the disk is full, the engine cannot start: the rest stands
            raw.beyond_llc = {"unavailable": _first_lines(str(exc))}
            log(f"memory roofline beyond the LLC unavailable: {raw.beyond_llc['unavailable']}")
            return
        rounds: list[dict[str, float]] = []
        try:
            for rep in self._repetitions(raw, "beyond the LLC", c.beyond_llc_rounds, 0.0):
                new = c.beyond_llc_new_tokens
                rounds.append(one_round(engine, rep, c.sweep_prompt_tokens, new, c.threads, bytes_per_token))
                log(f"beyond the LLC round {rep + 1}/{c.beyond_llc_rounds}: {rounds[-1]['share']:.0%}")
        except WorkerError as exc:  # the rounds before it stand
            raw.cut_short["beyond the LLC"] = _first_lines(str(exc))
            log(f"memory roofline beyond the LLC: {raw.cut_short['beyond the LLC']}")
        finally:
            engine.close()
        if not rounds:
            raw.beyond_llc = {"unavailable": raw.cut_short["beyond the LLC"]}
            return
        raw.beyond_llc = summarize(str(model.relative_to(self.repo)), bytes_per_token, llc_bytes, rounds)

    def _grammar(self, raw: RawResults) -> None:
        """Each level's streams with no constraint and with each of GRAMMAR_SCHEMAS on every row, back
        to back on the same prompts, the order rotated every repetition."""
        c = self.config
        if "grpc" not in self.workers:
            return
        raw.load["constrained decoding"] = os.getloadavg()[0]
        rng = random.Random(f"{c.seed}-grammar")
        for rep in self._repetitions(raw, "constrained decoding", c.grammar_reps, LORA_RESERVE_S):
            texts = self._texts(rng, c.sweep_prompt_tokens, max(c.grammar_concurrency))
            for level in c.grammar_concurrency:
                for mode in rotated(GRAMMAR_MODES, rep):
                    log(
                        f"constrained decoding rep {rep + 1}/{c.grammar_reps}: {level} streams, schema {mode}"
                    )
                    streams = self._call(
                        raw,
                        "grpc",
                        "streams",
                        prompts=texts[:level],
                        new_tokens=c.grammar_new_tokens,
                        json_schema=GRAMMAR_SCHEMAS.get(mode),
                    )
                    if streams is None:
                        return
                    raw.grammar.setdefault(level, {}).setdefault(mode, []).append(streams)
                    time.sleep(SETTLE_S)

    def _lora(self, raw: RawResults, model_dir: Path) -> None:
        """16 streams: the plain graph all base, the slotted graph all base, and four adapters mixed."""
        from .lora import CONFIGURATIONS, adapter_names, ensure_lora_model

        c = self.config
        log("LoRA: models/bench-lora and four converted PEFT adapters (built when missing)")
        lora_model, adapters = ensure_lora_model(self.repo, model_dir)
        raw.load["lora"] = os.getloadavg()[0]
        started: list[Worker] = []
        try:
            plain = self.workers.get("grpc")
            if plain is None:
                log("starting the grpc worker")
                plain = Worker(
                    "grpc", Path(sys.executable), model_dir, c.threads, self.repo, self.logs / "grpc.log"
                )
                started.append(plain)
            log("starting the grpc worker with adapter slots")
            slotted = Worker(
                "grpc",
                Path(sys.executable),
                lora_model,
                c.threads,
                self.repo,
                self.logs / "grpc-lora.log",
                lora_dir=adapters,
            )
            started.append(slotted)
            raw.peer_info["grpc-lora"] = slotted.info
            names = adapter_names()
            mixed = [names[i % len(names)] for i in range(c.lora_streams)]
            rng = random.Random(f"{c.seed}-lora")
            warm = self._texts(rng, c.sweep_prompt_tokens, c.lora_streams)
            plain.call("streams", prompts=warm, new_tokens=4)
            slotted.call("streams", prompts=warm, new_tokens=4, loras=mixed)  # loads the adapters
            for rep in self._repetitions(raw, "lora", c.lora_reps, 15.0):
                texts = self._texts(rng, c.sweep_prompt_tokens, c.lora_streams)
                for name in rotated(CONFIGURATIONS, rep):
                    log(f"LoRA rep {rep + 1}/{c.lora_reps}: {c.lora_streams} streams, {name}")
                    streams = (plain if name == "plain" else slotted).call(
                        "streams",
                        prompts=texts,
                        new_tokens=c.sweep_new_tokens,
                        loras=mixed if name == "lora_mixed" else None,
                    )
                    raw.lora.setdefault(name, []).append(streams)
                    time.sleep(SETTLE_S)
        except WorkerError as exc:
            raw.unavailable["lora"] = _first_lines(str(exc))
            log(f"LoRA section failed: {raw.unavailable['lora']}")
        finally:
            for worker in started:
                worker.close()

    # -- helpers -------------------------------------------------------------------------------------

    def _texts(self, rng: random.Random, prompt_tokens: int, count: int) -> list[str]:
        """Raw prompts of `prompt_tokens` tokens once the server puts BOS in front."""
        tok = self._tokenizer(self.repo / BENCH_MODEL)
        return [text_of_length(prompt_tokens - 1, tok.encode, tok.decode, rng) for _ in range(count)]

    def _present(self, names: Sequence[str]) -> list[str]:
        """The workers among `names` still running (one may have failed and been dropped)."""
        return [name for name in names if name in self.workers]

    def _call(self, raw: RawResults, name: str, op: str, **args: Any) -> Any:
        """The worker's answer, or None once it failed (it is then dropped from the rest of the run)."""
        if name not in self.workers:
            return None
        try:
            return self.workers[name].call(op, **args)
        except WorkerError as exc:
            self._drop(raw, name, exc)
            return None

    def _vocab(self) -> list[str]:
        """Whole lowercase words of the bench tokenizer's vocabulary, for prompts measured in words."""
        if not hasattr(self, "_words"):
            self._words = vocabulary_words(self.repo / BENCH_MODEL / "tokenizer.json")
        words: list[str] = self._words
        return words

    def _tokenizer(self, model_dir: Path) -> Any:
        if not hasattr(self, "_tok"):
            from textgen_server.tokenizer import Tokenizer

            self._tok = Tokenizer.from_file(model_dir / "tokenizer.json")
        return self._tok

    def _llamacpp_rate(self, name: str, depth: int, new_tokens: int) -> float:
        assert self.llamacpp is not None
        return self.llamacpp.decode_tok_s(LLAMACPP_PEERS[name], depth, new_tokens)

    def _drop_llamacpp(self, raw: RawResults, name: str, exc: Exception) -> None:
        raw.unavailable[name] = _first_lines(str(exc))
        log(f"{name} failed and is left out of the rest of the run: {raw.unavailable[name]}")
        self.llamacpp_peers.remove(name)

    def _drop(self, raw: RawResults, name: str, exc: Exception) -> None:
        if name == "engine":
            raise exc
        raw.unavailable[name] = _first_lines(str(exc))
        log(f"{name} failed and is left out of the rest of the run: {raw.unavailable[name]}")
        self.workers.pop(name).close()


def _first_lines(text: str, lines: int = 3) -> str:
    kept = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(kept[:1] + kept[-(lines - 1) :]) if len(kept) > lines else " | ".join(kept)
