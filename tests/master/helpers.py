"""Helpers the master's tests share."""
from __future__ import annotations

import time


def wait_for(predicate, timeout=5.0, interval=0.05):
    """``predicate()``'s first truthy value within ``timeout`` seconds, else AssertionError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")
