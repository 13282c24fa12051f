"""Polling with a deadline: the one wait loop that tests, benchmarks and tools share."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout_s: float = 10.0, interval_s: float = 0.05) -> T | None:
    """Poll ``predicate`` until it returns something truthy (returned) or the deadline passes (None)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)  # polling interval, not synchronisation
    return None
