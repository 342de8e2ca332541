"""Waiting on a condition with a deadline, for the benchmark; the tests take it through tests/support.py."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(probe: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Call `probe` until it returns something truthy and return that; TimeoutError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}; last value: {value!r}")
        time.sleep(interval)
