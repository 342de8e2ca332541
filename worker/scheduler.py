"""The scheduler loop: every worker enqueues the due occurrences of asyncproc_schedules.

Every worker runs it; a due schedule is locked by one of them at a time
(SKIP LOCKED), and the occurrence's row in asyncproc_schedule_runs, unique on
(name, time) and written with the task in one statement, makes each occurrence
run exactly once across the fleet.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import psycopg
import psycopg_pool
from psycopg.types.json import Jsonb

from asyncproc.config import WorkerSettings
from asyncproc.db import query
from asyncproc.schedules import Schedule, ScheduleError, due_occurrence

log = logging.getLogger(__name__)

# After a timing it cannot compute or that never fires (a bad cron written with SQL), look again this much later.
BROKEN_RETRY_SECONDS = 60


async def enqueue_schedules(settings: WorkerSettings, pool: psycopg_pool.AsyncConnectionPool) -> None:
    """One step of the scheduler loop (supervised in worker/main.py)."""
    async with pool.connection() as conn:
        enqueued = await enqueue_due(conn, settings.schedule_misfire_seconds)
    if enqueued:
        log.info("enqueued %s scheduled task(s)", enqueued)


async def enqueue_due(conn: psycopg.AsyncConnection, misfire_seconds: float) -> int:
    """Enqueue the due occurrence of every due schedule no other worker holds; how many."""
    enqueued = 0
    async with conn.transaction():
        rows = await (await conn.execute(query("schedules_lock_due"))).fetchall()
        for row in rows:
            now = row.pop("now")
            enqueued += await _advance(conn, Schedule(**row), now, misfire_seconds)
    return enqueued


async def _advance(conn: psycopg.AsyncConnection, schedule: Schedule, now: datetime, misfire_seconds: float) -> int:
    timing = schedule.timing
    try:
        # The table's CHECK is only the shape, and a row may predate it (a six-field cron fired every second).
        timing.check()
        due = None
        if schedule.next_run_at is not None:
            due = due_occurrence(timing, schedule.next_run_at, now, schedule.catch_up, misfire_seconds)
        next_run_at = timing.after(now)
    except ScheduleError as exc:
        log.error("schedule %s: %s", schedule.name, exc)
        await _update(conn, schedule.name, now + timedelta(seconds=BROKEN_RETRY_SECONDS), None, str(exc))
        return 0
    created = 0
    if due is not None:
        cursor = await conn.execute(
            query("schedule_run_enqueue"),
            {
                "name": schedule.name,
                "scheduled_for": due,
                "operation": schedule.operation,
                "payload": Jsonb(schedule.payload),
                "priority": schedule.priority,
                "max_attempts": schedule.max_attempts,
                "request_id": f"schedule:{schedule.name}",
            },
        )
        created = len(await cursor.fetchall())
    elif schedule.next_run_at is not None:
        log.warning("schedule %s: skipped occurrences from %s (catch_up skip)", schedule.name, schedule.next_run_at)
    await _update(conn, schedule.name, next_run_at, due, None)
    return created


async def _update(conn: psycopg.AsyncConnection, name: str, next_run_at: datetime, last_run_at: datetime | None, error: str | None) -> None:
    params = {"name": name, "next_run_at": next_run_at, "last_run_at": last_run_at, "last_error": error}
    await conn.execute(query("schedule_advance"), params)

