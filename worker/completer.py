"""Batched completion: outcomes of tasks that finish close together share one statement and one commit.

One statement and one commit for many outcomes spares PostgreSQL and the
worker's event loop a round trip, a statement and a commit each. The batch keeps
every outcome's own attempt fence (migrations/current/31_worker_outcomes.sql), and a caller is answered
only once its outcome is committed, so a job is never finished before its
task's outcome is durable.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable
from uuid import UUID

from asyncproc.ledger import Task

# Enough to cover every task a worker runs at once at any sane concurrency,
# small enough that one statement stays a few milliseconds.
MAX_BATCH = 200
# How long the first outcome of a batch waits for others, before one statement
# and one commit records them all. The worker fetches a job for each free slot
# at once (worker/app.py), so tasks that start together finish a few
# milliseconds apart; gathering for 2 ms made batches of many where there were
# batches of one or two, and figure 5 went from 569 to 674 tasks/s with one
# worker process and from 636 to 876 with two (5 ms: 685 and 946). It adds at
# most this much to a task's time to completion. Each batch is written at
# once, beside any batch still committing.
LINGER_SECONDS = 0.002

# (task_id, attempt, result, the id of the Procrastinate job that ran it)
Outcome = tuple[UUID, int, Any, int | None]
WriteBatch = Callable[[list[Outcome]], Awaitable[dict[UUID, Task]]]


class Completer:
    def __init__(self, write: WriteBatch, max_batch: int = MAX_BATCH, linger: float = LINGER_SECONDS):
        self._write = write
        self._max_batch = max_batch
        self._linger = linger
        self._waiting: list[tuple[Outcome, asyncio.Future]] = []
        self._gathering = False
        self._flushes: set[asyncio.Task] = set()

    async def complete(self, task_id: UUID, attempt: int, result: Any, job_id: int | None = None) -> Task | None:
        """Record one completion; the task as recorded, or None when its attempt's fence did not hold."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(((task_id, attempt, result, job_id), future))
        if not self._gathering:
            self._start_flush()
        # A caller cancelled while waiting leaves its outcome in the batch: the run happened.
        return await asyncio.shield(future)

    def _start_flush(self) -> None:
        self._gathering = True
        flush = asyncio.create_task(self._flush(), name="completer")
        self._flushes.add(flush)
        flush.add_done_callback(self._flushes.discard)

    async def _flush(self) -> None:
        if len(self._waiting) < self._max_batch:
            await asyncio.sleep(self._linger)
        batch, self._waiting = self._waiting[: self._max_batch], self._waiting[self._max_batch :]
        self._gathering = False
        if self._waiting:
            self._start_flush()
        try:
            recorded = await self._write([outcome for outcome, _ in batch])
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:
            # The loop is shutting down: the batch may or may not have committed, and a task
            # left running is the stalled-task sweep's to run again.
            for _, future in batch:
                future.cancel()
            raise
        for (task_id, _, _, _), future in batch:
            if not future.done():
                future.set_result(recorded.get(task_id))
