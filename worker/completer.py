"""Batched completion: outcomes of tasks that finish close together share one statement and one commit.

Each commit waits for its WAL flush, so with one commit per outcome a worker
running no-op tasks spends most of its time waiting on fsync. The batch keeps
every outcome's own attempt fence (migrations/0014), and a caller is answered
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
# How long the first outcome of a batch waits for others. None on purpose: a
# batch gathers while the previous one commits, and the outcomes of one turn of
# the event loop join it, so a lone task is recorded as soon as without
# batching. A deliberate wait measured no better on a loaded 2-core host.
LINGER_SECONDS = 0.0

Outcome = tuple[UUID, int, Any]
WriteBatch = Callable[[list[Outcome]], Awaitable[dict[UUID, Task]]]


class Completer:
    def __init__(self, write: WriteBatch, max_batch: int = MAX_BATCH, linger: float = LINGER_SECONDS):
        self._write = write
        self._max_batch = max_batch
        self._linger = linger
        self._waiting: list[tuple[Outcome, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None

    async def complete(self, task_id: UUID, attempt: int, result: Any) -> Task | None:
        """Record one completion; the task as recorded, or None when its attempt's fence did not hold."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(((task_id, attempt, result), future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_all(), name="completer")
        # A caller cancelled while waiting leaves its outcome in the batch: the run happened.
        return await asyncio.shield(future)

    async def _flush_all(self) -> None:
        while self._waiting:
            if len(self._waiting) < self._max_batch:
                await asyncio.sleep(self._linger)
            batch, self._waiting = self._waiting[: self._max_batch], self._waiting[self._max_batch :]
            try:
                recorded = await self._write([outcome for outcome, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            except BaseException:
                # The loop is shutting down: the batch may or may not have committed, and a task
                # left running is the stalled-task sweep's to run again.
                for _, future in batch:
                    future.cancel()
                raise
            for (task_id, _, _), future in batch:
                if not future.done():
                    future.set_result(recorded.get(task_id))
