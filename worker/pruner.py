"""The worker's ledger upkeep: compaction every few seconds, a prune pass every ASYNCPROC_PRUNE_INTERVAL_SECONDS.

Every worker runs this loop. Advisory locks let one of them compact and one of
them prune at a time; the others find the lock taken and wait for their next turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import psycopg
import psycopg_pool

from asyncproc import retention
from asyncproc.config import Settings

log = logging.getLogger(__name__)

# Readers of the counts add up the changes logged since the last compaction,
# so this bounds their work: at 1,000 status changes a second, 5,000 rows (~10 ms).
COMPACT_SECONDS = 5.0


async def prune_finished(settings: Settings, pool: psycopg_pool.AsyncConnectionPool, stopping: asyncio.Event) -> None:
    next_prune = time.monotonic()
    while not stopping.is_set():
        try:
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + settings.prune_interval_seconds
                report = await retention.prune_pass(settings, pool, stopping)
                if report.pruned:
                    log.info("pruned %s finished task(s) in %s batch(es)", report.pruned, report.batches)
            else:
                await retention.compact(pool)
        except (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout) as exc:
            log.warning("ledger upkeep skipped: %s", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stopping.wait(), min(COMPACT_SECONDS, settings.prune_interval_seconds))
