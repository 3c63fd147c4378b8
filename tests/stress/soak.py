"""Soak: many concurrent streams against a real `textgen-server` process for a long time (issue 14).

    python tests/stress/soak.py [--minutes 30] [--streams 32] [--model-dir models/tiny] [--out DIR]

Each of the streams sends one request after another, each with a behaviour drawn at random:
run to the end (streamed or unary), cancel after a few tokens, set a deadline (log-uniform from 2 ms
to 1 s, so some end during the prefill), or disconnect (close its own channel mid-stream). Every few
seconds it records the server's RSS, its running and queued counts (the Prometheus gauges
textgen_batch_current_size and textgen_queue_size) and the errors so far. It writes `soak.json`,
`soak_memory.png` and `server.log` (the server's log less its one line per request, which are
counted by status in soak.json) to --out and exits 1 when:

- any request ends with a status its behaviour did not ask for (only CANCELLED for cancels and
  disconnects, DEADLINE_EXCEEDED for deadlines; OK always), or a completed one is inconsistent
  (a constrained answer that breaks its schema, too);
- the server logs an ERROR, a traceback or a request that ended INTERNAL or UNKNOWN (except
  grpc's own line about a send racing a client that just left: counted in the report);
- a slot leaks: once the clients stop, running and queued are not back to 0;
- memory grows after warm-up (the rule in `memory_verdict`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jsonschema
from google.protobuf import json_format
from prometheus_client.parser import text_string_to_metric_families
from textgen.v1 import textgen_pb2 as pb
from textgen.v1 import textgen_pb2_grpc as rpc

SERVER = Path(sys.executable).parent / "textgen-server"
# Behaviour: (weight, the codes it may end with).
BEHAVIOURS: dict[str, tuple[int, frozenset[grpc.StatusCode]]] = {
    "complete": (4, frozenset({grpc.StatusCode.OK})),
    "unary": (1, frozenset({grpc.StatusCode.OK})),
    "cancel": (2, frozenset({grpc.StatusCode.OK, grpc.StatusCode.CANCELLED})),
    "deadline": (2, frozenset({grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED})),
    "disconnect": (1, frozenset({grpc.StatusCode.OK, grpc.StatusCode.CANCELLED})),
}
# grpc.aio logs this (with a traceback) when a send fails because the client has just gone away
# and core has not yet marked the call closed (grpc/grpc#32551 made it a log line instead of an
# unhandled task error). With cancels, deadlines and disconnects it happens now and then; it is
# counted and reported, not failed on: the call was over for that client, and no other is touched.
_GRPC_RACE = "ExecuteBatchError raised in core by servicer method"
_REQUEST_LINE = re.compile(r"textgen_server\.requests: request .*? status=(\w+)")
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
WARMUP_FRACTION = 0.2
# Allowed growth after warm-up: allocator noise is a few MiB; a leak of 1 kB per request at the
# ~60 requests/s of the build machine puts about 65 MiB between the two medians of a 30-minute run.
GROWTH_ALLOWANCE_MIB = 16.0
GROWTH_ALLOWANCE_FRACTION = 0.02


@dataclass
class MemoryVerdict:
    """The rule: warm-up is the first 20% of the run. The median RSS over the last 20% of the run
    may exceed the median over the 20% right after warm-up by at most 16 MiB + 2% of the latter."""

    baseline_mib: float
    final_mib: float
    growth_mib: float
    allowed_mib: float
    slope_mib_per_hour: float  # least-squares slope after warm-up, for the report
    ok: bool


def memory_verdict(seconds: list[float], rss_mib: list[float]) -> MemoryVerdict:
    end = seconds[-1]
    warm = [(t, r) for t, r in zip(seconds, rss_mib, strict=True) if t >= WARMUP_FRACTION * end]
    span = end - WARMUP_FRACTION * end
    first = [r for t, r in warm if t <= WARMUP_FRACTION * end + 0.2 * end] or [warm[0][1]]
    last = [r for t, r in warm if t >= end - 0.2 * end] or [warm[-1][1]]
    baseline, final = statistics.median(first), statistics.median(last)
    allowed = GROWTH_ALLOWANCE_MIB + GROWTH_ALLOWANCE_FRACTION * baseline
    times = [t for t, _ in warm]
    mean_t, mean_r = statistics.fmean(times), statistics.fmean(r for _, r in warm)
    var = sum((t - mean_t) ** 2 for t in times)
    slope = sum((t - mean_t) * (r - mean_r) for t, r in warm) / var if var and span else 0.0
    return MemoryVerdict(
        baseline, final, final - baseline, allowed, slope * 3600, final - baseline <= allowed
    )


@dataclass
class Sample:
    seconds: float
    rss_mib: float
    running: float
    queued: float
    kv_positions: float
    in_flight: int
    requests: int
    errors: int


@dataclass
class Tally:
    by_behaviour: Counter[tuple[str, str]] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    schema_checked: int = 0  # completed constrained answers held to their schemas

    def add(self, behaviour: str, code: grpc.StatusCode, problem: str | None = None) -> None:
        self.by_behaviour[(behaviour, code.name)] += 1
        if problem is not None:
            self.error_count += 1
            if len(self.errors) < 50:
                self.errors.append(problem)

    @property
    def requests(self) -> int:
        return sum(self.by_behaviour.values())


class ServerProcess:
    """`textgen-server` on a free port, its log read in a thread (ERROR lines and tracebacks kept)."""

    def __init__(self, model_dir: Path, metrics_port: int) -> None:
        args = [
            str(SERVER),
            "--model-dir",
            str(model_dir),
            "--port",
            "0",
            "--metrics-port",
            str(metrics_port),
        ]
        self.process = subprocess.Popen([*args, "--grace", "10"], stderr=subprocess.PIPE, text=True)
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.port = 0
        self.problems: list[str] = []
        self.lines: list[str] = []
        self.grpc_races = 0
        self.request_statuses: Counter[str] = Counter()  # from the server's request log lines
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        in_race = False  # inside the traceback of a log line counted as a grpc race
        for line in self.process.stderr:
            self.lines.append(line)
            if match := re.search(r"listening on [\d.]+:(\d+)", line):
                self.port = int(match.group(1))
            if "ready on" in line or "cannot" in line:
                self._ready.set()
            if request := _REQUEST_LINE.search(line):  # the server's one line per request
                self.lines.pop()  # 100,000 of them: counted, not kept
                self.request_statuses[request.group(1)] += 1
                if request.group(1) in ("INTERNAL", "UNKNOWN"):
                    self.problems.append(line.rstrip())
                continue
            if _TIMESTAMP.match(line):
                in_race = _GRPC_RACE in line
                if in_race:
                    self.grpc_races += 1
                elif " ERROR " in line or " CRITICAL " in line:
                    self.problems.append(line.rstrip())
            elif "Traceback" in line and not in_race:
                self.problems.append(line.rstrip())
        self._ready.set()

    def wait_ready(self) -> None:
        if not self._ready.wait(120) or not self.port or self.problems:
            raise SystemExit(f"the server did not start: {self.problems}")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def gauges(self) -> dict[str, float]:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text = response.read().decode()
        wanted = {
            "textgen_batch_current_size",
            "textgen_queue_size",
            "textgen_kv_positions",
            "textgen_prefill_tokens",  # counters: the family drops `_total`, its first sample has it
            "textgen_prefix_cache_tokens",
        }
        return {
            family.name: family.samples[0].value
            for family in text_string_to_metric_families(text)
            if family.name in wanted
        }

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# A system prompt every "shared" chat starts with: those requests take it from the prefix cache.
_SHARED_SYSTEM = " ".join(f"rule {i}: answer briefly and cite the river delta." for i in range(30))


# Constrained chats: JSON mode, and tools (one with references, as pydantic writes parameters, one
# taking any JSON). Their completed answers are checked against the schemas, which rows whose
# grammars or masks got mixed up in a batch would fail.
_PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
_PLACE = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "country": {"enum": ["FR", "DE"]}},
    "required": ["city", "country"],
    "additionalProperties": False,
}
_TOOL_PARAMETERS = {
    "get_weather": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "route": {
        "$defs": {"Place": _PLACE},
        "type": "object",
        "properties": {"origin": {"$ref": "#/$defs/Place"}, "destination": {"$ref": "#/$defs/Place"}},
        "required": ["origin", "destination"],
        "additionalProperties": False,
    },
    # Any JSON (its numbers bounded by the grammar so that the response's Struct carries them).
    "note": {"type": "object", "properties": {"payload": {}}, "required": ["payload"]},
}


def _constrained(rng: random.Random, max_tokens: int) -> pb.GenerateRequest:
    chat: dict[str, Any] = {
        "messages": [{"role": "user", "content": f"Tell me about {rng.randint(0, 10**6)}"}]
    }
    body: dict[str, Any] = {
        "chat": chat,
        "max_tokens": max_tokens,
        "temperature": rng.choice([0.0, 0.7, 1.0]),
        "seed": rng.randint(1, 10**9),
    }
    if rng.random() < 0.5:
        body["response_format"] = {"type": "json_schema", "json_schema": _PERSON}
    else:
        chat["tools"] = [{"name": name, "parameters": schema} for name, schema in _TOOL_PARAMETERS.items()]
        chat["tool_choice"] = rng.choice(["auto", "required", "route", "note"])
    return json_format.ParseDict(body, pb.GenerateRequest())


def _request(rng: random.Random) -> pb.GenerateRequest:
    """Short chats, chats behind one long shared system prompt (prefix cache hits), raw prompts of up
    to 6,000 characters (about 1,000 to 2,000 tokens: several prefill chunks), and constrained chats
    (JSON mode or tools)."""
    max_tokens = rng.choice([1, 4, 16, 64, 128, 256])
    draw = rng.random()
    if draw >= 0.7:
        return _constrained(rng, max_tokens)
    if draw < 0.2:
        messages = [
            pb.Message(role="system", content=_SHARED_SYSTEM),
            pb.Message(role="user", content=f"Tell me about {rng.randint(0, 10**6)}"),
        ]
        return pb.GenerateRequest(
            chat=pb.Chat(messages=messages),
            max_tokens=max_tokens,
            temperature=0.7,
            seed=rng.randint(1, 10**9),
        )
    if draw < 0.5:
        words = rng.randint(100, 1000)
        prompt = " ".join(rng.choice(["alpha", "beta", "7", "gamma", "river", "delta"]) for _ in range(words))
        prompt = prompt[:6000]
        return pb.GenerateRequest(prompt=prompt, raw=True, max_tokens=max_tokens, seed=rng.randint(1, 10**9))
    chat = pb.Chat(messages=[pb.Message(role="user", content=f"Tell me about {rng.randint(0, 10**6)}")])
    temperature = rng.choice([0.0, 0.7, 1.0])
    return pb.GenerateRequest(
        chat=chat, max_tokens=max_tokens, temperature=temperature, seed=rng.randint(1, 10**9)
    )


def _consistent(request: pb.GenerateRequest, chunks: list[pb.GenerateStreamResponse]) -> str | None:
    if not chunks or chunks[-1].finish_reason == pb.FINISH_REASON_UNSPECIFIED:
        return "a completed stream without a finish reason"
    if len(chunks) != chunks[-1].usage.completion_tokens:
        return f"{len(chunks)} stream messages but usage says {chunks[-1].usage.completion_tokens}"
    text = "".join(chunk.response for chunk in chunks)
    return _answer_problem(request, text, list(chunks[-1].tool_calls), chunks[-1].finish_reason)


def _schema_checked(request: pb.GenerateRequest, finish_reason: int) -> bool:
    """Whether an answer is one _answer_problem holds to a schema: constrained and complete (one cut
    by max_tokens is a prefix)."""
    constrained = request.response_format.type == "json_schema" or bool(request.chat.tools)
    return constrained and finish_reason == pb.FINISH_REASON_STOP


def _answer_problem(
    request: pb.GenerateRequest, text: str, calls: list[pb.ToolCall], finish_reason: int
) -> str | None:
    """What is wrong with a completed constrained answer: JSON that does not match the schema, calls
    that do not match their tool's parameters, text where only calls were allowed."""
    if not _schema_checked(request, finish_reason):
        return None
    try:
        if request.response_format.type == "json_schema":
            jsonschema.validate(json.loads(text), _PERSON)
        for call in calls:
            jsonschema.validate(json_format.MessageToDict(call.arguments), _TOOL_PARAMETERS[call.name])
    except (ValueError, KeyError, jsonschema.ValidationError) as exc:
        return f"a constrained answer broke its schema: {type(exc).__name__}: {str(exc)[:200]}"
    choice = request.chat.tool_choice
    if request.chat.tools and choice != "auto" and (text or not calls):
        return f"tool_choice {choice!r} answered with text {text[:40]!r} and {len(calls)} calls"
    if request.chat.tools and calls and text:
        return f"both text {text[:40]!r} and {len(calls)} calls"
    return None


class Soak:
    def __init__(self, target: str, streams: int, seconds: float, seed: int) -> None:
        self.target = target
        self.streams = streams
        self.seconds = seconds
        self.rng = random.Random(seed)
        self.tally = Tally()
        self.in_flight = 0
        self.stopping = False

    async def run(self) -> None:
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = rpc.TextGenerationStub(channel)
            end = time.monotonic() + self.seconds
            await asyncio.gather(
                *(self._worker(stub, end, random.Random(self.rng.random())) for _ in range(self.streams))
            )

    async def _worker(self, stub: rpc.TextGenerationStub, end: float, rng: random.Random) -> None:
        names = list(BEHAVIOURS)
        weights = [BEHAVIOURS[n][0] for n in names]
        while time.monotonic() < end:
            behaviour = rng.choices(names, weights)[0]
            self.in_flight += 1
            try:
                code, problem = await self._one(stub, behaviour, rng)
            except Exception as exc:  # noqa: BLE001 -- a client-side surprise is an error to report too
                code, problem = grpc.StatusCode.UNKNOWN, f"{behaviour}: client raised {exc!r}"
            finally:
                self.in_flight -= 1
            if problem is None and code not in BEHAVIOURS[behaviour][1]:
                problem = f"{behaviour}: unexpected {code.name}"
            self.tally.add(behaviour, code, problem)

    async def _one(
        self, stub: rpc.TextGenerationStub, behaviour: str, rng: random.Random
    ) -> tuple[grpc.StatusCode, str | None]:
        request = _request(rng)
        try:
            if behaviour == "unary":
                response = await stub.Generate(request, timeout=120)
                if response.finish_reason == pb.FINISH_REASON_UNSPECIFIED:
                    return grpc.StatusCode.OK, "unary response without a finish reason"
                self.tally.schema_checked += _schema_checked(request, response.finish_reason)
                calls = list(response.tool_calls)
                return grpc.StatusCode.OK, _answer_problem(
                    request, response.response, calls, response.finish_reason
                )
            if behaviour == "disconnect":
                return await self._disconnect(request, rng)
            timeout = (
                math.exp(rng.uniform(math.log(0.002), math.log(1.0))) if behaviour == "deadline" else 120
            )
            call = stub.GenerateStream(request, timeout=timeout)
            cancel_after = rng.randint(0, 20) if behaviour == "cancel" else None
            chunks: list[pb.GenerateStreamResponse] = []
            if cancel_after == 0:
                call.cancel()
            else:
                async for chunk in call:
                    chunks.append(chunk)
                    if cancel_after is not None and len(chunks) >= cancel_after:
                        call.cancel()
                        break
            code = await call.code()
            if code == grpc.StatusCode.OK:
                self.tally.schema_checked += bool(chunks) and _schema_checked(
                    request, chunks[-1].finish_reason
                )
                return code, _consistent(request, chunks)
            return code, None if code in BEHAVIOURS[behaviour][
                1
            ] else f"{behaviour}: {code.name} {await call.details()}"
        except grpc.aio.AioRpcError as error:
            code = error.code()
            return code, None if code in BEHAVIOURS[behaviour][
                1
            ] else f"{behaviour}: {code.name} {error.details()}"
        except asyncio.CancelledError:
            return grpc.StatusCode.CANCELLED, None if behaviour == "cancel" else f"{behaviour}: cancelled"

    async def _disconnect(
        self, request: pb.GenerateRequest, rng: random.Random
    ) -> tuple[grpc.StatusCode, str | None]:
        """A client of its own that goes away mid-stream: its channel, and so its connection, closes."""
        channel = grpc.aio.insecure_channel(self.target)
        call = rpc.TextGenerationStub(channel).GenerateStream(request, timeout=120)
        after = rng.randint(1, 20)
        chunks = 0
        try:
            async for _ in call:
                chunks += 1
                if chunks >= after:
                    await channel.close()  # cancels the call and closes the connection
                    return grpc.StatusCode.CANCELLED, None
            return await call.code(), None
        except grpc.aio.AioRpcError as error:
            return error.code(), None
        except asyncio.CancelledError:
            return grpc.StatusCode.CANCELLED, None
        finally:
            await channel.close()


async def _sample_until(
    soak: Soak, server: ServerProcess, every: float, started: float, samples: list[Sample]
) -> None:
    while not soak.stopping:
        gauges = await asyncio.to_thread(server.gauges)
        samples.append(
            Sample(
                seconds=time.monotonic() - started,
                rss_mib=server.rss_mib(),
                running=gauges.get("textgen_batch_current_size", math.nan),
                queued=gauges.get("textgen_queue_size", math.nan),
                kv_positions=gauges.get("textgen_kv_positions", math.nan),
                in_flight=soak.in_flight,
                requests=soak.tally.requests,
                errors=soak.tally.error_count,
            )
        )
        await asyncio.sleep(every)


async def _soak(args: argparse.Namespace, server: ServerProcess) -> tuple[Soak, list[Sample], float]:
    soak = Soak(f"127.0.0.1:{server.port}", args.streams, args.minutes * 60, args.seed)
    samples: list[Sample] = []
    started = time.monotonic()
    sampler = asyncio.create_task(_sample_until(soak, server, args.sample_seconds, started, samples))
    await soak.run()
    soak.stopping = True
    await sampler
    return soak, samples, time.monotonic() - started


def _settle(server: ServerProcess) -> dict[str, float]:
    """Running and queued once the clients have stopped (the gauges of the scheduler's last step),
    then one more request: the server still answers."""
    deadline = time.monotonic() + 30
    gauges = server.gauges()
    while (
        gauges["textgen_batch_current_size"] or gauges["textgen_queue_size"]
    ) and time.monotonic() < deadline:
        time.sleep(0.2)
        gauges = server.gauges()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        request = pb.GenerateRequest(prompt="Still there?", max_tokens=2)
        rpc.TextGenerationStub(channel).Generate(request, timeout=60)
    return gauges


def _plot(samples: list[Sample], verdict: MemoryVerdict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s.seconds / 60 for s in samples]
    end = minutes[-1]
    fig, (memory, slots) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=[2, 1])
    memory.plot(minutes, [s.rss_mib for s in samples], color="tab:blue", lw=1.2, label="server RSS")
    memory.axvspan(0, WARMUP_FRACTION * end, color="0.9", label="warm-up")
    memory.hlines(
        verdict.baseline_mib, WARMUP_FRACTION * end, 0.4 * end, colors="tab:green", label="baseline median"
    )
    memory.hlines(verdict.final_mib, 0.8 * end, end, colors="tab:red", label="final median")
    memory.set_ylabel("RSS (MiB)")
    memory.set_title(title)
    memory.legend(loc="lower right", fontsize=8)
    slots.plot(minutes, [s.running for s in samples], lw=1, label="running (textgen_batch_current_size)")
    slots.plot(minutes, [s.queued for s in samples], lw=1, label="queued (textgen_queue_size)")
    slots.set_xlabel("minutes")
    slots.set_ylabel("requests")
    slots.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--model-dir", type=Path, default=Path("models/tiny"))
    parser.add_argument("--out", type=Path, default=Path("docs/reliability"))
    parser.add_argument("--sample-seconds", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=14)
    args = parser.parse_args(argv)
    server = ServerProcess(args.model_dir, _free_port())
    try:
        server.wait_ready()
        soak, samples, elapsed = asyncio.run(_soak(args, server))
        final = _settle(server)
    finally:
        exit_code = server.stop() if server.process.poll() is None else server.process.returncode
    verdict = memory_verdict([s.seconds for s in samples], [s.rss_mib for s in samples])
    leaked = {"running": final["textgen_batch_current_size"], "queued": final["textgen_queue_size"]}
    by_code = Counter[str]()
    for (_, code), count in soak.tally.by_behaviour.items():
        by_code[code] += count
    failures = []
    if soak.tally.error_count:
        failures.append(
            f"{soak.tally.error_count} requests ended as they should not: {soak.tally.errors[:5]}"
        )
    if server.problems:
        failures.append(f"the server logged {len(server.problems)} errors: {server.problems[:5]}")
    if any(leaked.values()):
        failures.append(f"slots leaked: {leaked}")
    if not verdict.ok:
        failures.append(
            f"memory grew {verdict.growth_mib:.1f} MiB after warm-up (allowed {verdict.allowed_mib:.1f})"
        )
    if exit_code != 0:
        failures.append(f"the server exited {exit_code} on SIGTERM")
    args.out.mkdir(parents=True, exist_ok=True)
    title = (
        f"soak: {args.streams} streams, {elapsed / 60:.1f} min, {soak.tally.requests} requests; "
        f"RSS {verdict.growth_mib:+.1f} MiB after warm-up"
    )
    _plot(samples, verdict, title, args.out / "soak_memory.png")
    report: dict[str, Any] = {
        "streams": args.streams,
        "minutes": round(elapsed / 60, 2),
        "requests": soak.tally.requests,
        "by_code": dict(by_code.most_common()),
        "by_behaviour": {f"{b} {c}": n for (b, c), n in sorted(soak.tally.by_behaviour.items())},
        "errors": soak.tally.errors,
        "constrained_answers_checked": soak.tally.schema_checked,
        "server_errors": server.problems,
        "prompt_tokens": {
            "prefilled": final.get("textgen_prefill_tokens"),
            "from_prefix_cache": final.get("textgen_prefix_cache_tokens"),
        },
        "grpc_send_races": server.grpc_races,
        "server_request_log_by_status": dict(server.request_statuses.most_common()),
        "slots_at_end": leaked,
        "memory": asdict(verdict),
        "server_exit_code": exit_code,
        "passed": not failures,
        "failures": failures,
        "samples": [asdict(s) for s in samples],
    }
    (args.out / "server.log").write_text("".join(server.lines))
    (args.out / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"{title}\nby code: {dict(by_code.most_common())}\nslots at end: {leaked}\n"
        f"memory: baseline {verdict.baseline_mib:.1f} MiB, final {verdict.final_mib:.1f} MiB, "
        f"growth {verdict.growth_mib:+.1f} (allowed {verdict.allowed_mib:.1f}), "
        f"slope {verdict.slope_mib_per_hour:+.1f} MiB/h\ngrpc send races logged: {server.grpc_races}\n"
        f"constrained answers held to their schemas: {soak.tally.schema_checked}"
    )
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
