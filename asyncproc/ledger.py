"""One function per named query on the tasks table, typed rows in and out.

The API is synchronous and the worker asynchronous; each query exists only in
the flavour its caller needs.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg
from psycopg.types.json import Jsonb

from asyncproc.db import query

FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
STATUSES = FINAL_STATUSES | {"pending", "running"}


@dataclass(frozen=True, slots=True)
class Task:
    task_id: UUID
    operation: str
    payload: dict[str, Any]
    status: str
    result: Any
    error_message: str | None
    attempts: int
    max_attempts: int
    priority: int
    progress: int | None
    progress_message: str | None
    created_at: datetime
    scheduled_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    updated_at: datetime
    idempotency_key: str | None
    request_id: str | None
    # api_keys.id of the key that created it; None without access control.
    owner: int | None = None
    # The task's own time limit in seconds; None: its operation's, or the worker's default.
    timeout_seconds: float | None = None
    # Why a pending task is held back by its operation's limits (migrations/current/40_limits.sql).
    wait_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATUSES


@dataclass(frozen=True, slots=True)
class NewTask:
    operation: str
    payload: dict[str, Any]
    max_attempts: int
    priority: int = 0
    run_at: datetime | None = None
    idempotency_key: str | None = None
    request_id: str | None = None
    owner: int | None = None
    timeout_seconds: float | None = None
    # A hash of the whole request, compared when its Idempotency-Key is replayed.
    idempotency_fingerprint: str | None = None
    callback_url: str | None = None


@dataclass(frozen=True, slots=True)
class IdempotentTask:
    task_id: UUID
    idempotency_fingerprint: str | None


def _task(row: dict[str, Any] | None) -> Task | None:
    return None if row is None else Task(**row)


_TIMESTAMPS = ("created_at", "scheduled_at", "started_at", "completed_at", "updated_at")


class UndecodablePayload(Exception):
    """A claimed task whose payload Python cannot decode (too deep, numbers too long)."""

    def __init__(self, task: Task, reason: str):
        super().__init__(reason)
        self.task = task


def task_from_claim(document: dict[str, Any]) -> Task:
    """A claimed task row, as the claim wrote it (migrations/current/30_procrastinate_claim_and_fetch.sql): to_jsonb() with the payload as text.

    Raises UndecodablePayload, carrying the task with an empty payload, when
    the payload cannot be decoded.
    """
    fields = {name: document[name] for name in Task.__slots__ if name != "payload"}
    fields["task_id"] = UUID(fields["task_id"])
    for name in _TIMESTAMPS:
        if fields[name] is not None:
            fields[name] = datetime.fromisoformat(fields[name])
    try:
        payload = json.loads(document["payload_json"])
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise UndecodablePayload(Task(payload={}, **fields), f"the payload cannot be decoded: {reason}") from None
    return Task(payload=payload, **fields)


def task_insert(conn: psycopg.Connection, new: NewTask) -> Task | None:
    """Insert a task, or return None when its idempotency key is already taken."""
    row = conn.execute(
        query("task_insert"),
        {
            "operation": new.operation,
            "payload": Jsonb(new.payload),
            "max_attempts": new.max_attempts,
            "priority": new.priority,
            "run_at": new.run_at,
            "idempotency_key": new.idempotency_key,
            "request_id": new.request_id,
            "owner": new.owner,
            "timeout_seconds": new.timeout_seconds,
            "idempotency_fingerprint": new.idempotency_fingerprint,
            "callback_url": new.callback_url,
        },
    ).fetchone()
    return _task(row)


def _insert_columns(task_ids: list[UUID], tasks: list[NewTask]) -> dict[str, list[Any]]:
    """The column arrays that the multi-row INSERTs unnest, one entry per task."""
    return {
        "task_ids": task_ids,
        "operations": [new.operation for new in tasks],
        "payloads": [Jsonb(new.payload) for new in tasks],
        "max_attempts": [new.max_attempts for new in tasks],
        "priorities": [new.priority for new in tasks],
        "run_ats": [new.run_at for new in tasks],
        "owners": [new.owner for new in tasks],
        "timeouts": [new.timeout_seconds for new in tasks],
        "callback_urls": [new.callback_url for new in tasks],
    }


def new_task_id() -> UUID:
    """A UUIDv7, as the tasks table's default makes it (asyncproc_new_task_id, migrations/0025_baseline.sql): the
    Unix time in ms, then 74 random bits; new tasks stay at the end of every
    index on their id."""
    random_bits = int.from_bytes(os.urandom(10), "big")
    milliseconds = time.time_ns() // 1_000_000
    return UUID(int=(milliseconds & (1 << 48) - 1) << 80 | 0x7 << 76 | (random_bits >> 68) << 64
                | 0b10 << 62 | random_bits & (1 << 62) - 1)


def tasks_insert_many(conn: psycopg.Connection, tasks: list[NewTask]) -> list[Task | None]:
    """Insert many single-task requests with one statement; each one's task, or None when its idempotency key is taken."""
    task_ids = [new_task_id() for _ in tasks]
    params = {
        **_insert_columns(task_ids, tasks),
        "idempotency_keys": [new.idempotency_key for new in tasks],
        "request_ids": [new.request_id for new in tasks],
        "fingerprints": [new.idempotency_fingerprint for new in tasks],
    }
    inserted = {row["task_id"]: Task(**row) for row in conn.execute(query("tasks_insert_many"), params).fetchall()}
    return [inserted.get(task_id) for task_id in task_ids]


def task_insert_batch(conn: psycopg.Connection, tasks: list[NewTask], request_id: str | None) -> list[UUID]:
    """Insert many tasks with one statement; returns their ids in order."""
    task_ids = [new_task_id() for _ in tasks]
    conn.execute(query("task_insert_batch"), {**_insert_columns(task_ids, tasks), "request_id": request_id})
    return task_ids


def task_get(conn: psycopg.Connection, task_id: UUID) -> Task | None:
    return _task(conn.execute(query("task_get"), {"task_id": task_id}).fetchone())


def task_find_by_idempotency_key(conn: psycopg.Connection, key: str, owner: int | None) -> IdempotentTask | None:
    row = conn.execute(query("task_find_by_idempotency_key"), {"idempotency_key": key, "owner": owner}).fetchone()
    return None if row is None else IdempotentTask(**row)


async def _one(conn: psycopg.AsyncConnection, name: str, params: dict[str, Any]) -> Task | None:
    cursor = await conn.execute(query(name), params)
    return _task(await cursor.fetchone())


@dataclass(frozen=True)
class Completions:
    """What a batch of completions recorded: the tasks whose fence held, by id, and the jobs it finished."""

    tasks: dict[UUID, Task]
    finished_jobs: frozenset[int]


async def tasks_mark_completed(
    conn: psycopg.AsyncConnection, outcomes: list[tuple[UUID, int, Any, int | None]]
) -> Completions:
    """Record many (task_id, attempt, result, job_id) outcomes at once, and finish their jobs."""
    params = {
        "task_ids": [task_id for task_id, _, _, _ in outcomes],
        "attempts": [attempt for _, attempt, _, _ in outcomes],
        "results": [Jsonb(result) for _, _, result, _ in outcomes],
        "job_ids": [job_id for _, _, _, job_id in outcomes if job_id is not None],
    }
    cursor = await conn.execute(query("tasks_mark_completed"), params)
    rows = await cursor.fetchall()
    # Every row carries the same finished_jobs; a batch that recorded no task is one row of NULLs beside them.
    finished = frozenset(rows[0]["finished_jobs"])
    tasks = {}
    for row in rows:
        del row["finished_jobs"]
        if row["task_id"] is not None:
            tasks[row["task_id"]] = Task(**row)
    return Completions(tasks, finished)


async def task_mark_failed(
    conn: psycopg.AsyncConnection, task_id: UUID, attempt: int, error_message: str
) -> Task | None:
    params = {"task_id": task_id, "attempt": attempt, "error_message": error_message}
    return await _one(conn, "task_mark_failed", params)


async def task_mark_retry(
    conn: psycopg.AsyncConnection,
    task_id: UUID,
    attempt: int,
    error_message: str,
    delay_seconds: float,
) -> Task | None:
    params = {
        "task_id": task_id,
        "attempt": attempt,
        "error_message": error_message,
        "delay_seconds": delay_seconds,
    }
    return await _one(conn, "task_mark_retry", params)


async def task_count_running_jobs(conn: psycopg.AsyncConnection, task_id: UUID) -> int:
    cursor = await conn.execute(query("task_count_running_jobs"), {"task_id": task_id})
    row = await cursor.fetchone()
    return row["running"]


async def task_set_progress(
    conn: psycopg.AsyncConnection, task_id: UUID, attempt: int, progress: int, message: str | None
) -> None:
    params = {"task_id": task_id, "attempt": attempt, "progress": progress, "message": message}
    await conn.execute(query("task_set_progress"), params)


def task_retry(conn: psycopg.Connection, task_id: UUID) -> Task:
    """Re-queue a failed or cancelled task (SQL asyncproc_retry)."""
    return _task(conn.execute(query("task_retry"), {"task_id": task_id}).fetchone())


def task_cancel(conn: psycopg.Connection, task_id: UUID) -> Task:
    """Cancel a pending or running task (SQL asyncproc_cancel)."""
    return _task(conn.execute(query("task_cancel"), {"task_id": task_id}).fetchone())


def tasks_retry_failed(conn: psycopg.Connection, since: timedelta, operation: str | None) -> int:
    row = conn.execute(query("tasks_retry_failed"), {"since": since, "operation": operation}).fetchone()
    return row["retried"]


async def task_release(
    conn: psycopg.AsyncConnection, task_id: UUID, attempt: int, reason: str, delay_seconds: float = 0.0
) -> Task | None:
    """Give back the attempt of a claim that ran nothing (a shutdown cut it short, or no handler here), and re-queue the task after `delay_seconds`."""
    params = {"task_id": task_id, "attempt": attempt, "reason": reason, "delay_seconds": delay_seconds}
    return await _one(conn, "task_release", params)


@dataclass(frozen=True, slots=True)
class SweepReport:
    requeued: int
    failed: int
    redeferred: int
    dropped: int


async def tasks_sweep(conn: psycopg.AsyncConnection, stalled_seconds: float) -> SweepReport:
    """Repair dead jobs and the invariant between tasks and jobs (SQL asyncproc_sweep)."""
    cursor = await conn.execute(query("tasks_sweep"), {"stalled_seconds": stalled_seconds})
    return SweepReport(**await cursor.fetchone())


def tasks_count_active_of_owner(conn: psycopg.Connection, owner: int) -> int:
    return conn.execute(query("tasks_count_active_of_owner"), {"owner": owner}).fetchone()["n"]


def tasks_get_many(conn: psycopg.Connection, task_ids: list[UUID]) -> list[Task]:
    return [Task(**row) for row in conn.execute(query("tasks_get_many"), {"task_ids": task_ids})]


@dataclass(frozen=True, slots=True)
class Attempt:
    """One run of a task, as the attempts ledger keeps it (migrations/current/60_attempts.sql)."""

    attempt: int
    worker_id: int | None
    host: str | None
    pid: int | None
    started_at: datetime
    finished_at: datetime | None
    outcome: str
    error: str | None


def task_attempts(conn: psycopg.Connection, task_id: UUID) -> list[Attempt]:
    return [Attempt(**row) for row in conn.execute(query("task_attempts"), {"task_id": task_id})]


async def jobs_abandon(conn: psycopg.AsyncConnection, job_ids: list[int]) -> int:
    """Mark the jobs of thread handlers that outlive their worker: the sweep releases them once its lease lapses."""
    cursor = await conn.execute(query("jobs_abandon"), {"job_ids": job_ids})
    return (await cursor.fetchone())["abandoned"]
