"""Retention: delete finished tasks past ASYNCPROC_RETAIN_*; compact the counts and history.

One pass prunes in bounded batches, each its own short transaction, with a
pause after each batch so that the API's and the workers' commits are never
queued behind a long run of deletes. Only one session in the fleet prunes at a
time (a transaction-level advisory lock in asyncproc_prune). Used by the
worker's ledger upkeep loop (worker/pruner.py) and by `asyncproc prune`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, TextIO

import psycopg
import psycopg_pool

from asyncproc import db
from asyncproc.config import DatabaseSettings, RetentionSettings
from asyncproc.db import query
from asyncproc.humanize import duration
from asyncproc.loops import wait_or_stop

log = logging.getLogger(__name__)

# After each batch the pruner rests PAUSE_RATIO times as long as the batch took
# (at least MIN_PAUSE_SECONDS): queued commits get through, and pruning takes at
# most a third of the database's time. On a 2-core machine that still deletes
# several thousand rows a second, against 500 a second arriving at 43M a day.
PAUSE_RATIO = 2.0
MIN_PAUSE_SECONDS = 0.02
# Readers of the counts add up the changes logged since the last compaction,
# so this bounds their work: at 1,000 status changes a second, 5,000 rows (~10 ms).
# A prune pass folds them in this often too: over millions of rows it lasts
# minutes, and so would the log, and every prune batch and /metrics read it.
COMPACT_SECONDS = 5.0


@dataclass
class PruneReport:
    pruned: int = 0
    batches: int = 0
    # Time spent inside batches, pauses excluded.
    busy_seconds: float = 0.0
    # Another session held the pruning lock, so this pass stopped early.
    busy: bool = False


def keep_parameters(settings: RetentionSettings) -> dict[str, Any]:
    """The retention defaults as query parameters; None (forever) becomes NULL."""
    return {
        "keep_completed": settings.retain_completed,
        "keep_failed": settings.retain_failed,
        "keep_cancelled": settings.retain_cancelled,
    }


async def prune_pass(settings: RetentionSettings, pool: psycopg_pool.AsyncConnectionPool, stopping: asyncio.Event) -> PruneReport:
    """Prune until nothing is due (or `stopping` is set), compacting every COMPACT_SECONDS on the
    way, then compact the counts and history."""
    report = PruneReport()
    parameters = {**keep_parameters(settings), "batch_size": settings.prune_batch_size}
    compacted = time.monotonic()
    while not stopping.is_set():
        if time.monotonic() - compacted >= COMPACT_SECONDS:
            await compact(pool)
            compacted = time.monotonic()
        started = time.monotonic()
        async with pool.connection() as conn:
            row = await (await conn.execute(query("retention_prune"), parameters)).fetchone()
        if row["pruned"] is None:
            report.busy = True
            return report
        report.pruned += row["pruned"]
        report.batches += 1
        report.busy_seconds += time.monotonic() - started
        if row["pruned"] < settings.prune_batch_size:
            break
        await wait_or_stop(stopping, max(MIN_PAUSE_SECONDS, PAUSE_RATIO * (time.monotonic() - started)))
    await compact(pool)
    return report


async def compact(pool: psycopg_pool.AsyncConnectionPool) -> None:
    """Fold the changes logged since the last pass into the counts and the history."""
    async with pool.connection() as conn:
        await conn.execute(query("retention_compact"))


def due(conn: psycopg.Connection, settings: RetentionSettings) -> list[dict[str, Any]]:
    """Per (operation, status): its retention and how many rows a prune would delete now."""
    return conn.execute(query("retention_due"), keep_parameters(settings)).fetchall()


def _keep_text(keep) -> str:
    return "forever" if keep is None else duration(keep)


def run(database: DatabaseSettings, settings: RetentionSettings, dry_run: bool, out: TextIO) -> int:
    """`asyncproc prune [--dry-run]`."""
    if dry_run:
        with db.connect(database.url, database, "asyncproc-prune") as conn:
            rows = due(conn, settings)
        for row in rows:
            print(f"{row['operation']}\t{row['status']}\tkeep {_keep_text(row['keep'])}\t{row['due'] or 0} due", file=out)
        print(f"would prune {sum(row['due'] or 0 for row in rows)} task(s)", file=out)
        return 0
    report = asyncio.run(_prune_now(database, settings))
    if report.busy:
        print(f"pruned {report.pruned} task(s), then stopped: another session is pruning", file=out)
    else:
        print(f"pruned {report.pruned} task(s)", file=out)
    return 0


async def _prune_now(database: DatabaseSettings, settings: RetentionSettings) -> PruneReport:
    pool = db.async_pool(database, "asyncproc-prune", 1)
    await pool.open(wait=True)
    try:
        return await prune_pass(settings, pool, asyncio.Event())
    finally:
        await pool.close()
