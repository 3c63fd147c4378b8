"""The soak's memory rule (tests/stress/soak.py), on made-up series: flat passes, a leak fails."""

from __future__ import annotations

import math

from stress.soak import GROWTH_ALLOWANCE_MIB, memory_verdict

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
