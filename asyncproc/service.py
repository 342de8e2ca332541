"""The use cases shared by the API, the CLI and the tests."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any, Callable
from uuid import UUID

import psycopg
import psycopg_pool

from asyncproc import jsonb, ledger, quotas
from asyncproc.cache import ResultCache, version_of
from asyncproc.db import query, translate_errors
from asyncproc.errors import Conflict, DatabaseUnavailable, TaskNotFound
from asyncproc.group_commit import GroupCommit
from asyncproc.ledger import NewTask, Task
from asyncproc.quotas import NO_QUOTA, Quota
from asyncproc.task_events import TaskEvents

log = logging.getLogger(__name__)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def task_document(task: Task) -> dict[str, Any]:
    """The public JSON shape of a task, a superset of the seed's."""
    return {
        "task_id": str(task.task_id),
        "status": task.status,
        "result": task.result,
        "error_message": task.error_message,
        "created_at": _iso(task.created_at),
        "completed_at": _iso(task.completed_at),
        "operation": task.operation,
        "attempts": task.attempts,
        "max_attempts": task.max_attempts,
        "started_at": _iso(task.started_at),
        "scheduled_at": _iso(task.scheduled_at),
        "progress": task.progress,
        "progress_message": task.progress_message,
        "wait_reason": task.wait_reason,
    }


def encode_document(task: Task) -> bytes:
    return jsonb.dumps(task_document(task)).encode()


def enqueue(
    pool: psycopg_pool.ConnectionPool, inserts: GroupCommit, new: NewTask, quota: Quota = NO_QUOTA
) -> tuple[Task, bool]:
    """Store and queue one task, committed on return; (task, created).

    The task shares its INSERT and commit with those that concurrent requests
    submit at the same moment (asyncproc/group_commit.py), unless its key has a
    quota: the count and the insert are then one transaction of its own.
    A repeated Idempotency-Key of the same owner returns the original task,
    provided the request was the same, by value; otherwise it is a conflict.
    """
    with translate_errors():
        if quota.max_active_tasks is not None and new.owner is not None:
            with pool.connection() as conn, conn.transaction():
                quotas.check_active(conn, quota, new.owner, 1)
                task = ledger.task_insert(conn, new)
        else:
            task = inserts.insert(new)
    if task is not None:
        return task, True
    with translate_errors(), pool.connection() as conn:
        found = ledger.task_find_by_idempotency_key(conn, new.idempotency_key, new.owner)
        existing = None if found is None else ledger.task_get(conn, found.task_id)
    if found is None or existing is None:
        # The key's row vanished between the statements (deleted by hand).
        raise Conflict("The Idempotency-Key was in use a moment ago; retry the request")
    if found.idempotency_fingerprint is not None:
        same = found.idempotency_fingerprint == new.idempotency_fingerprint
    else:
        # A row inserted without the API: what it stores is all there is to compare.
        same = (existing.operation, existing.payload, existing.max_attempts, existing.priority) == (
            new.operation,
            new.payload,
            new.max_attempts,
            new.priority,
        )
    if not same:
        raise Conflict(
            "This Idempotency-Key was already used for a different request",
            details={"task_id": str(existing.task_id)},
        )
    return existing, False


def enqueue_batch(
    pool: psycopg_pool.ConnectionPool, tasks: list[NewTask], request_id: str | None, quota: Quota = NO_QUOTA
) -> list[UUID]:
    """Store and queue many tasks in one statement and one commit; their ids in order."""
    with translate_errors(), pool.connection() as conn, conn.transaction():
        # The count and the insert in one transaction, under the key's row lock, so that
        # concurrent requests of one key cannot all pass the same count.
        quotas.check_active(conn, quota, tasks[0].owner, len(tasks))
        return ledger.task_insert_batch(conn, tasks, request_id)


def owned_task(conn: psycopg.Connection, task_id: UUID, owner: int | None) -> Task:
    """The task, if `owner` may see it; otherwise TaskNotFound, so that another
    client's task and a missing one look the same. owner=None means access
    control is off and every task is visible."""
    task = ledger.task_get(conn, task_id)
    if task is None or (owner is not None and task.owner != owner):
        raise TaskNotFound(f"No task with id {task_id}")
    return task


def lookup(
    pool: psycopg_pool.ConnectionPool, cache: ResultCache, task_id: UUID, owner: int | None
) -> tuple[bytes, bool]:
    """(document, finished): from the cache, which holds finished tasks only, else PostgreSQL.

    The cache does not know owners, so with access control every read checks
    the owner in PostgreSQL.
    """
    if owner is None:
        cached = cache.get(task_id)
        if cached is not None:
            return cached, True
    with translate_errors(), pool.connection() as conn:
        task = owned_task(conn, task_id, owner)
    document = encode_document(task)
    if task.finished:
        cache.put(task_id, document, task.updated_at)
    return document, task.finished


def result_document(
    pool: psycopg_pool.ConnectionPool, cache: ResultCache, task_id: UUID, owner: int | None = None
) -> bytes:
    return lookup(pool, cache, task_id, owner)[0]


def callback_deliveries(pool: psycopg_pool.ConnectionPool, task_id: UUID, owner: int | None = None) -> list[dict[str, Any]]:
    """The task's completion-webhook deliveries, each with every attempt, oldest first."""
    with translate_errors(), pool.connection() as conn:
        owned_task(conn, task_id, owner)
        rows = conn.execute(query("callback_list_for_task"), {"task_id": task_id}).fetchall()
    return [
        {**row, **{name: _iso(row[name]) for name in ("next_attempt_at", "created_at", "delivered_at")}}
        for row in rows
    ]


def attempts(pool: psycopg_pool.ConnectionPool, task_id: UUID, owner: int | None = None) -> list[dict[str, Any]]:
    """Every run of the task, oldest first, from the attempts ledger."""
    with translate_errors(), pool.connection() as conn:
        owned_task(conn, task_id, owner)
        runs = ledger.task_attempts(conn, task_id)
    return [
        {
            "attempt": run.attempt,
            "worker_id": run.worker_id,
            "host": run.host,
            "pid": run.pid,
            "started_at": _iso(run.started_at),
            "finished_at": _iso(run.finished_at),
            "outcome": run.outcome,
            "error": run.error,
            "counted": run.outcome != "interrupted",
        }
        for run in runs
    ]


def retry(pool: psycopg_pool.ConnectionPool, cache: ResultCache, task_id: UUID, owner: int | None = None) -> Task:
    """Re-queue a failed or cancelled task, through SQL asyncproc_retry."""
    return _operator_change(pool, cache, ledger.task_retry, task_id, owner)


def cancel(pool: psycopg_pool.ConnectionPool, cache: ResultCache, task_id: UUID, owner: int | None = None) -> Task:
    """Cancel a pending or running task, through SQL asyncproc_cancel."""
    return _operator_change(pool, cache, ledger.task_cancel, task_id, owner)


def _operator_change(
    pool: psycopg_pool.ConnectionPool,
    cache: ResultCache,
    change: Callable[..., Task],
    task_id: UUID,
    owner: int | None,
) -> Task:
    with translate_errors(), pool.connection() as conn:
        if owner is not None:
            owned_task(conn, task_id, owner)
        task = change(conn, task_id)
    cache.invalidate(task_id, version_of(task.updated_at))
    log.info("task %s is now %s", task_id, task.status)
    return task


def retry_failed(pool: psycopg_pool.ConnectionPool, since: timedelta, operation: str | None) -> int:
    """Re-queue the tasks that failed within `since`, through SQL asyncproc_retry_failed.

    Their cached results go as every API process hears of the change.
    """
    with translate_errors(), pool.connection() as conn:
        retried = ledger.tasks_retry_failed(conn, since, operation)
    log.info("re-queued %s failed task(s)", retried)
    return retried


def health(pool: psycopg_pool.ConnectionPool, cache: ResultCache, events: TaskEvents) -> tuple[bool, dict[str, Any]]:
    database = "ok"
    try:
        with translate_errors(), pool.connection() as conn:
            conn.execute("SELECT 1")
    except DatabaseUnavailable:
        database = "down"
    healthy = database == "ok"
    return healthy, {
        "status": "ok" if healthy else "unavailable",
        "database": database,
        "cache": cache.ping(),
        # Without its listener the API still answers, polling: reported, not fatal.
        "listener": events.state,
    }
