"""The worker's pruner loop: every ASYNCPROC_PRUNE_INTERVAL_SECONDS, one prune pass.

Every worker runs this loop; asyncproc_prune's advisory lock lets one of them
prune at a time, and the others find the lock taken and wait for their next turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import psycopg
import psycopg_pool

from asyncproc import retention
from asyncproc.config import Settings

log = logging.getLogger(__name__)


async def prune_finished(settings: Settings, pool: psycopg_pool.AsyncConnectionPool, stopping: asyncio.Event) -> None:
    while not stopping.is_set():
        try:
            report = await retention.prune_pass(settings, pool, stopping)
            if report.pruned:
                log.info("pruned %s finished task(s) in %s batch(es)", report.pruned, report.batches)
        except (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout) as exc:
            log.warning("prune pass skipped: %s", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stopping.wait(), settings.prune_interval_seconds)
