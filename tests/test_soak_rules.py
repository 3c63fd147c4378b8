"""The soak's rules (tests/stress/soak.py): memory on made-up series (flat passes, a leak fails), and
the check of constrained answers on made-up answers."""

from __future__ import annotations

import math
import random

from google.protobuf import struct_pb2
from stress.soak import GROWTH_ALLOWANCE_MIB, _answer_problem, _constrained, memory_verdict
from textgen.v1 import textgen_pb2 as pb

MINUTES = [m * 5 / 60 for m in range(360)]  # a 30-minute run sampled every 5 s
SECONDS = [m * 60 for m in MINUTES]


def test_flat_memory_with_noise_and_a_warm_up_climb_passes() -> None:
    # Climbs 80 MiB while the caches and the allocator warm up, then wobbles by 3 MiB.
    rss = [200 + 80 * min(m / 4, 1) + 3 * math.sin(m * 7) for m in MINUTES]
    verdict = memory_verdict(SECONDS, rss)
    assert verdict.ok and abs(verdict.growth_mib) < 4, verdict


def test_a_steady_leak_fails() -> None:
    # 1.5 MiB a minute: 36 MiB over the measured 24 minutes.
    rss = [300 + 1.5 * m for m in MINUTES]
    verdict = memory_verdict(SECONDS, rss)
    assert not verdict.ok and verdict.growth_mib > GROWTH_ALLOWANCE_MIB, verdict
    assert 80 < verdict.slope_mib_per_hour < 100


def test_a_late_jump_fails() -> None:
    rss = [300.0 if m < 27 else 360.0 for m in MINUTES]
    assert not memory_verdict(SECONDS, rss).ok


def _call(name: str, arguments: dict[str, object]) -> pb.ToolCall:
    struct = struct_pb2.Struct()
    struct.update(arguments)
    return pb.ToolCall(name=name, arguments=struct)


def test_constrained_answers_are_held_to_their_schemas() -> None:
    rng = random.Random(0)
    requests = [_constrained(rng, 64) for _ in range(40)]
    json_mode = next(r for r in requests if r.response_format.type == "json_schema")
    required = next(r for r in requests if r.chat.tool_choice == "required")
    stop, length = pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH
    assert _answer_problem(json_mode, ' {"name":"Ann","age":30}', [], stop) is None
    assert "broke its schema" in str(_answer_problem(json_mode, '{"name":"Ann","age":300}', [], stop))
    assert "broke its schema" in str(_answer_problem(json_mode, '{"name":"Ann"', [], stop))
    assert _answer_problem(json_mode, '{"name":"Ann"', [], length) is None  # cut short: a prefix
    place = {"city": "Lyon", "country": "FR"}
    route = _call("route", {"origin": place, "destination": place})
    assert _answer_problem(required, "", [route], stop) is None
    wrong = _call("route", {"origin": {**place, "country": "XX"}, "destination": place})
    assert "broke its schema" in str(_answer_problem(required, "", [wrong], stop))
    assert "answered with text" in str(_answer_problem(required, "Sunny.", [], stop))
