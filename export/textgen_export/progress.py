"""Progress lines for long export steps: a 7B export spends minutes writing its decoder graph."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class StepStatus:
    """What a running step has got to (say, "12 of 32 layers written"); the heartbeat line shows it."""

    detail: str = ""


class Progress:
    def __init__(self, total_steps: int, heartbeat_s: float = 30.0) -> None:
        self.total_steps = total_steps
        self.heartbeat_s = heartbeat_s
        self._step = 0

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[StepStatus]:
        """Prints the step's start and end, and every `heartbeat_s` while it runs a line with its
        number, elapsed time and the status the step sets (say "[2/3] 90 s: 12 of 32 layers written")."""
        self._step += 1
        number = self._step
        label = f"[{number}/{self.total_steps}] {what}"
        print(f"{label} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        status = StepStatus()
        done = threading.Event()

        def heartbeat() -> None:
            while not done.wait(self.heartbeat_s):
                detail = f": {status.detail}" if status.detail else ""
                elapsed = time.monotonic() - started
                print(
                    f"    [{number}/{self.total_steps}] {elapsed:.0f} s{detail}", file=sys.stderr, flush=True
                )

        ticker = threading.Thread(target=heartbeat, daemon=True)
        ticker.start()
        try:
            yield status
        finally:
            done.set()
            ticker.join()
        print(f"{label}: done in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
