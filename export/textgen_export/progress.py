"""Progress lines for long export steps: a 7B export spends many silent minutes in torch.onnx."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator


class Progress:
    def __init__(self, total_steps: int, heartbeat_s: float = 30.0) -> None:
        self.total_steps = total_steps
        self.heartbeat_s = heartbeat_s
        self._step = 0

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        self._step += 1
        label = f"[{self._step}/{self.total_steps}] {what}"
        print(f"{label} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        done = threading.Event()

        def heartbeat() -> None:
            while not done.wait(self.heartbeat_s):
                print(f"    still {what} ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)

        ticker = threading.Thread(target=heartbeat, daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()
        print(f"{label}: done in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
