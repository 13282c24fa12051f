"""Small helpers shared by tests."""

import time


def wait_for(predicate, timeout_s: float = 10.0, interval_s: float = 0.05):
    """Poll ``predicate`` until it returns something truthy (returned) or the deadline passes (None)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    return None
