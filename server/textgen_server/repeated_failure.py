"""A failure that can repeat at every step, logged so that it cannot flood the log.

A decode pass of the whole batch that runs out of memory fails again at the next step, and the next,
for as long as the batch stays that large (the scheduler then decodes it in parts): a traceback
per step would be dozens a second on a GPU. The first failure of a run is logged with its traceback,
the repeats as one line at most every `interval_s`, and the first pass after them says how long the
run lasted. The metrics count every failure (`textgen_batch_forward_failures`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

REPORT_INTERVAL_S = 60.0


class RepeatedFailureLog:
    """The log of one operation that may fail at every step (see the module docstring)."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = REPORT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._clock = clock
        self._run_began: float | None = None  # the first failure of the current run
        self._reported: float = 0.0  # when the run was last logged
        self._unreported = 0  # failures since then
        self._total = 0  # failures in the run

    def failed(self, message: str, error: BaseException) -> None:
        """`error` happened again (`message` says what failed): logged with its traceback if it begins a
        run, else counted, and the count logged once `interval_s` has passed since the last report."""
        now = self._clock()
        self._total += 1
        if self._run_began is None:
            self._run_began = self._reported = now
            self._logger.error("%s", message, exc_info=error)
            return
        self._unreported += 1
        if now - self._reported >= self._interval_s:
            self._logger.error(
                "%s: again %d times in the last %.0f s (%s)",
                message,
                self._unreported,
                now - self._reported,
                _one_line(error),
            )
            self._reported, self._unreported = now, 0

    def passed(self, what: str) -> None:
        """The operation passed: end the run of failures, if any, saying how long it lasted."""
        if self._run_began is None:
            return
        elapsed = self._clock() - self._run_began
        self._logger.warning("%s: passing again after %d failures in %.1f s", what, self._total, elapsed)
        self._run_began, self._unreported, self._total = None, 0, 0


def _one_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    return text if len(text) <= 200 else text[:199] + "…"
