"""Background loops that cannot die silently.

A loop step that raises is logged (a lost database as one line, anything else
with its traceback) and the loop goes on after a pause that grows while the
failures last. Each loop keeps a LoopHealth, which /health and the worker's
metrics report: a loop that keeps failing is visible, not just absent.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Awaitable, Callable

from asyncproc import db

log = logging.getLogger(__name__)

# This many failures in a row, and the loop is reported as failing.
FAILING_AFTER = 3
MAX_BACKOFF_SECONDS = 30.0


class LoopHealth:
    """How one background loop is doing: consecutive failures and the last error."""

    def __init__(self, name: str):
        self.name = name
        self._lock = threading.Lock()
        self._failures_in_a_row = 0
        self.failures_total = 0
        self.last_error: str | None = None

    def succeeded(self) -> None:
        with self._lock:
            self._failures_in_a_row = 0

    def failed(self, exc: BaseException) -> int:
        """Record and log a failure; returns how many in a row."""
        with self._lock:
            self._failures_in_a_row += 1
            self.failures_total += 1
            self.last_error = db.describe_error(exc)
            in_a_row = self._failures_in_a_row
        if db.is_connection_error(exc):
            log.warning("%s: lost the database (%s); retrying", self.name, self.last_error)
        else:
            log.error("%s failed (%s in a row): %s", self.name, in_a_row, self.last_error, exc_info=exc)
        return in_a_row

    @property
    def failing(self) -> bool:
        return self._failures_in_a_row >= FAILING_AFTER

    @property
    def state(self) -> str:
        return "failing" if self.failing else "ok"

    def backoff(self, period: float) -> float:
        """The pause before the next try: the loop's period, doubled per failure in a row, capped."""
        return min(period * 2 ** max(0, self._failures_in_a_row - 1), max(period, MAX_BACKOFF_SECONDS))


async def run_periodically(
    health: LoopHealth, step: Callable[[], Awaitable[None]], period: float, stopping: asyncio.Event
) -> None:
    """Run `step` every `period` seconds until `stopping` is set, surviving any exception it raises."""
    while not stopping.is_set():
        try:
            await step()
        except Exception as exc:
            health.failed(exc)
        else:
            health.succeeded()
        await wait_or_stop(stopping, health.backoff(period))


async def wait_or_stop(stopping: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stopping.wait(), seconds)
    except asyncio.TimeoutError:
        pass
