"""The worker's ledger upkeep: compaction every few seconds, a prune pass every ASYNCPROC_PRUNE_INTERVAL_SECONDS.

Every worker runs it as a supervised loop (asyncproc.loops) beside the sweep.
Advisory locks let one worker compact and one prune at a time; the others
find the lock taken and wait for their next turn.
"""

from __future__ import annotations

import asyncio
import logging
import time

import psycopg_pool

from asyncproc import retention
from asyncproc.config import RetentionSettings

log = logging.getLogger(__name__)


def upkeep_period(settings: RetentionSettings) -> float:
    return min(retention.COMPACT_SECONDS, settings.prune_interval_seconds)


class LedgerUpkeep:
    """One step of the loop: a prune pass (which ends with a compaction) when one is due, else a compaction."""

    def __init__(self, settings: RetentionSettings, pool: psycopg_pool.AsyncConnectionPool, stopping: asyncio.Event):
        self._settings = settings
        self._pool = pool
        self._stopping = stopping
        self._next_prune = time.monotonic()

    async def step(self) -> None:
        if time.monotonic() < self._next_prune:
            await retention.compact(self._pool)
            return
        self._next_prune = time.monotonic() + self._settings.prune_interval_seconds
        report = await retention.prune_pass(self._settings, self._pool, self._stopping)
        if report.pruned:
            log.info("pruned %s finished task(s) in %s batch(es)", report.pruned, report.batches)
