"""One task's lifecycle: claim the row, run the handler, record the outcome."""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import random
import time
from concurrent.futures import Executor
from typing import Any, Awaitable, Callable

import psycopg
import psycopg_pool

from asyncproc import ledger
from asyncproc.cache import AsyncResultCache
from asyncproc.config import Settings
from asyncproc.ledger import Task
from asyncproc.logs import request_id_var
from asyncproc.service import encode_document
from worker.operations import PermanentError, Registry, TaskContext

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 4000
# Past this, an outcome that cannot be written is left to the stalled-task sweep.
DB_OUTAGE_PATIENCE_SECONDS = 120.0


class Runner:
    def __init__(
        self,
        settings: Settings,
        pool: psycopg_pool.AsyncConnectionPool,
        cache: AsyncResultCache,
        registry: Registry,
        executor: Executor,
    ):
        self.settings = settings
        self.pool = pool
        self.cache = cache
        self.registry = registry
        self.executor = executor
        self.in_flight = 0

    async def run(self, raw_task_id: str, claimed: dict[str, Any] | None) -> None:
        """Run a task that fetching its job already claimed (migrations/0004)."""
        if claimed is None:
            log.info("task %s is no longer pending; nothing to run", raw_task_id)
            return
        task = ledger.task_from_json(claimed)
        token = request_id_var.set(task.request_id or str(task.task_id))
        try:
            await self._run_claimed(task)
        finally:
            request_id_var.reset(token)

    async def _run_claimed(self, task: Task) -> None:
        await self.cache.invalidate(task.task_id)
        log.info("task %s started: %s, attempt %s of %s", task.task_id, task.operation, task.attempts, task.max_attempts)
        try:
            result = await self._execute(task)
        except asyncio.CancelledError:
            log.warning("task %s interrupted by shutdown; re-queueing it", task.task_id)
            await self._write(
                ledger.task_mark_retry, task.task_id, task.attempts, "interrupted by worker shutdown", 0.0
            )
            raise
        except PermanentError as exc:
            await self._fail(task, _describe(exc), retry=False)
        except Exception as exc:
            await self._fail(task, _describe(exc), retry=True)
        else:
            await self._complete(task, result)

    async def _execute(self, task: Task) -> Any:
        handler = self.registry.get(task.operation)
        if handler is None:
            raise PermanentError(
                f"unknown operation {task.operation!r}; known: {', '.join(self.registry.names())}"
            )
        ctx = TaskContext(
            task_id=task.task_id,
            attempt=task.attempts,
            max_attempts=task.max_attempts,
            request_id=task.request_id,
            compute_seconds=self.settings.compute_seconds,
        )
        self.in_flight += 1
        try:
            if inspect.iscoroutinefunction(handler):
                return await handler(task.payload, ctx)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, functools.partial(handler, task.payload, ctx))
        finally:
            self.in_flight -= 1

    async def _complete(self, task: Task, result: Any) -> None:
        try:
            json.dumps(result, allow_nan=False)
        except (TypeError, ValueError) as exc:
            await self._fail(task, f"the handler's result cannot be stored as JSON: {exc}", retry=False)
            return
        try:
            done = await self._write(ledger.task_mark_completed, task.task_id, task.attempts, result)
        except psycopg.DataError as exc:
            await self._fail(task, f"the handler's result cannot be stored: {exc}", retry=False)
            return
        if done is None:
            log.warning("task %s changed while it ran (cancelled or re-queued); result discarded", task.task_id)
            return
        log.info("task %s completed", task.task_id)
        await self.cache.put(done.task_id, encode_document(done))

    async def _fail(self, task: Task, error: str, retry: bool) -> None:
        if retry and task.attempts < task.max_attempts:
            delay = self.backoff(task.attempts)
            recorded = await self._write(ledger.task_mark_retry, task.task_id, task.attempts, error, delay)
            if recorded is not None:
                log.warning("task %s attempt %s failed (%s); retrying in %.1fs", task.task_id, task.attempts, error, delay)
            return
        failed = await self._write(ledger.task_mark_failed, task.task_id, task.attempts, error)
        if failed is None:
            log.warning("task %s changed while it ran; failure not recorded", task.task_id)
            return
        log.warning("task %s failed after %s attempt(s): %s", task.task_id, task.attempts, error)
        await self.cache.put(failed.task_id, encode_document(failed))

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with +-20 % jitter, so that failed tasks spread out."""
        base = self.settings.retry_backoff_seconds * 2 ** (attempt - 1)
        return min(base, self.settings.retry_backoff_max_seconds) * random.uniform(0.8, 1.2)

    async def _write(self, write: Callable[..., Awaitable[Task | None]], *args: Any) -> Task | None:
        """Record an outcome, waiting out a database outage: the run already happened."""
        deadline = time.monotonic() + DB_OUTAGE_PATIENCE_SECONDS
        delay = 0.2
        while True:
            try:
                async with self.pool.connection() as conn:
                    return await write(conn, *args)
            except (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout) as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("database unavailable while recording %s (%s); retrying", write.__name__, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return message[:MAX_ERROR_CHARS]
