"""The use cases shared by the API, the CLI and the tests."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg_pool

from asyncproc import ledger
from asyncproc.cache import ResultCache
from asyncproc.db import translate_errors
from asyncproc.errors import Conflict, DatabaseUnavailable, TaskNotFound
from asyncproc.ledger import NewTask, Task

log = logging.getLogger(__name__)

# The same default as the tasks.max_attempts column; a test keeps them equal.
DEFAULT_MAX_ATTEMPTS = 3


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
    }


def encode_document(task: Task) -> bytes:
    return json.dumps(task_document(task), separators=(",", ":")).encode()


def enqueue(pool: psycopg_pool.ConnectionPool, new: NewTask) -> tuple[Task, bool]:
    """Store and queue one task in a single commit; (task, created).

    A repeated Idempotency-Key returns the original task, provided the request
    asked for the same work; otherwise it is a conflict.
    """
    with translate_errors(), pool.connection() as conn:
        task = ledger.task_insert(conn, new)
        if task is not None:
            return task, True
        existing = ledger.task_get_by_idempotency_key(conn, new.idempotency_key)
    if existing is None:
        # The key's row vanished between the two statements (deleted by hand).
        raise Conflict("The Idempotency-Key was in use a moment ago; retry the request")
    if (existing.operation, existing.payload, existing.max_attempts, existing.priority) != (
        new.operation,
        new.payload,
        new.max_attempts,
        new.priority,
    ):
        raise Conflict(
            "This Idempotency-Key was already used for a different request",
            details={"task_id": str(existing.task_id)},
        )
    return existing, False


def enqueue_batch(pool: psycopg_pool.ConnectionPool, tasks: list[NewTask], request_id: str | None) -> list[UUID]:
    """Store and queue many tasks in one statement and one commit; their ids in order."""
    with translate_errors(), pool.connection() as conn:
        return ledger.task_insert_batch(conn, tasks, request_id)


def result_document(pool: psycopg_pool.ConnectionPool, cache: ResultCache, task_id: UUID) -> bytes:
    """The task's JSON document: from the cache when finished, else from PostgreSQL."""
    cached = cache.get(task_id)
    if cached is not None:
        return cached
    with translate_errors(), pool.connection() as conn:
        task = ledger.task_get(conn, task_id)
    if task is None:
        raise TaskNotFound(f"No task with id {task_id}")
    document = encode_document(task)
    if task.finished:
        cache.put(task_id, document)
    return document


def health(pool: psycopg_pool.ConnectionPool, cache: ResultCache) -> tuple[bool, dict[str, Any]]:
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
    }
