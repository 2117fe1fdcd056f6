"""Bounded waits for tests: a condition polled until true, or an assertion naming what never happened."""

from __future__ import annotations

import time
from typing import Any, Callable


def wait_until(what: str, cond: Callable[[], Any], timeout: float = 90.0, period: float = 0.2) -> Any:
    """Poll `cond` every `period` s until it returns something true (returned); fail after `timeout` s.
    The bound is a liveness guard (a stuck system fails instead of hanging), never a timing assertion."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(period)
