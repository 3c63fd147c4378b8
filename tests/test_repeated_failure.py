"""A failure repeated at every step: one traceback, then one line a minute, then when it passes."""

from __future__ import annotations

import logging

import pytest
from textgen_server.repeated_failure import RepeatedFailureLog


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _fail(failures: RepeatedFailureLog, clock: _Clock, at: float, rows: int = 16) -> None:
    clock.now = at
    try:
        raise RuntimeError("Failed to allocate memory for requested buffer of size 65536\nsecond line")
    except RuntimeError as exc:
        failures.failed(f"decode pass of {rows} rows failed; decoding each row alone", exc)


def test_a_run_of_failures_logs_one_traceback_then_a_line_a_minute_then_its_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("test.repeated")
    clock = _Clock()
    failures = RepeatedFailureLog(logger, interval_s=60.0, clock=clock)
    caplog.set_level(logging.INFO, logger="test.repeated")
    failures.passed("the batch's decode pass")  # nothing failed: nothing to say
    assert caplog.records == []

    for step in range(100):  # 100 steps of 0.1 s: one traceback
        _fail(failures, clock, 100.0 + step * 0.1)
    assert len(caplog.records) == 1
    first = caplog.records[0]
    assert first.levelno == logging.ERROR and first.exc_info is not None
    assert first.getMessage() == "decode pass of 16 rows failed; decoding each row alone"

    _fail(failures, clock, 160.5, rows=15)  # a minute after the first: one line for the 100 since
    assert len(caplog.records) == 2
    summary = caplog.records[1]
    assert summary.exc_info is None
    assert summary.getMessage() == (
        "decode pass of 15 rows failed; decoding each row alone: again 100 times in the last 60 s "
        "(RuntimeError: Failed to allocate memory for requested buffer of size 65536)"
    )
    _fail(failures, clock, 170.0)  # within the next minute: silent
    assert len(caplog.records) == 2

    clock.now = 175.0
    failures.passed("the batch's decode pass")
    assert caplog.records[2].levelno == logging.WARNING
    assert caplog.records[2].getMessage() == (
        "the batch's decode pass: passing again after 102 failures in 75.0 s"
    )
    failures.passed("the batch's decode pass")
    assert len(caplog.records) == 3

    _fail(failures, clock, 176.0)  # a new run: its own traceback at once
    assert len(caplog.records) == 4 and caplog.records[3].exc_info is not None
