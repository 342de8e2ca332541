"""One task's lifecycle: claim the row, run the handler, record the outcome."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import threading
import time
from concurrent.futures import Executor
from typing import Any, Awaitable, Callable
from uuid import UUID

import psycopg
import psycopg_pool

from asyncproc import ledger
from asyncproc.cache import AsyncResultCache, version_of
from asyncproc.config import WorkerSettings
from asyncproc.ledger import Task
from asyncproc.logs import request_id_var
from asyncproc.operations import Operation, PermanentError, Registry, TaskContext
from asyncproc.service import encode_document
from worker.completer import Completer
from worker.lease import Lease, LeaseLost
from worker.metrics import WorkerMetrics
from worker.pool import AttemptStopped, Call, HandlerError, ProcessPool

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 4000
# The longest pause between two looks for a worker that knows a task's operation.
UNKNOWN_OPERATION_MAX_DELAY_SECONDS = 60.0


class Runner:
    def __init__(
        self,
        settings: WorkerSettings,
        pool: psycopg_pool.AsyncConnectionPool,
        cache: AsyncResultCache,
        registry: Registry,
        executor: Executor,
        processes: ProcessPool,
        lease: Lease,
        metrics: WorkerMetrics | None = None,
    ):
        self.settings = settings
        self.pool = pool
        self.cache = cache
        self.registry = registry
        self.executor = executor
        self.processes = processes
        self.lease = lease
        self.metrics = metrics or WorkerMetrics()
        # Handler threads still running, counted by the threads themselves: a
        # thread abandoned at shutdown outlives its task.
        self.in_flight = 0
        self._count_lock = threading.Lock()
        # The runs of async handlers on the loop now, for the lease's fence,
        # and those the fence cancelled: lost runs, which count.
        self._async_runs: set[asyncio.Task] = set()
        self._fenced_runs: set[asyncio.Task] = set()
        self.metrics.running.set_function(lambda: self.in_flight + len(self._async_runs) + self.processes.running)
        # Set when the worker is stopping: a thread handler cut short then is
        # abandoned (its job kept, for the sweep to release once the process
        # and its lease are gone) instead of waited for.
        self.shutting_down = False
        # Jobs of thread handlers abandoned at shutdown: the job manager leaves
        # them unfinished (worker/app.py), and the worker marks them before it exits.
        self.abandoned_jobs: set[int] = set()
        # The asyncio tasks running a task now, for interrupt().
        self._runs: set[asyncio.Task] = set()
        self.completer = Completer(self._write_completions)
        # Jobs that a completion finished in its own statement (migrations/current/31_worker_outcomes.sql): the
        # job manager skips Procrastinate's finish for these (worker/app.py).
        self.finished_jobs: set[int] = set()

    @property
    def async_running(self) -> int:
        return len(self._async_runs)

    def stop_async_handlers(self, stopped: threading.Event) -> None:
        """Cancel every async handler (on the loop, for the lease's fence); `stopped` is set once none runs."""
        runs = list(self._async_runs)
        self._fenced_runs.update(runs)
        for run in runs:
            run.cancel()

        async def wait() -> None:
            if runs:
                await asyncio.wait(runs)
            stopped.set()

        asyncio.get_running_loop().create_task(wait())

    async def run(
        self, raw_task_id: str, claimed: dict[str, Any] | None, job_id: int | None = None, worker_id: int | None = None
    ) -> None:
        """Run a task that fetching its job already claimed (migrations/current/30_procrastinate_claim_and_fetch.sql).

        `worker_id` is the lease the job was fetched under: the handler starts
        only while that lease is valid, and its outcome is written only while
        it is not lost (worker/lease.py).
        """
        if claimed is None:
            log.info("task %s was not claimable (not pending, not due, or held by another transaction)", raw_task_id)
            return
        try:
            task = ledger.task_from_claim(claimed)
        except ledger.UndecodablePayload as exc:
            token = request_id_var.set(exc.task.request_id or str(exc.task.task_id))
            try:
                await self._fail(exc.task, str(exc), retry=False, worker_id=worker_id)
            finally:
                request_id_var.reset(token)
            return
        token = request_id_var.set(task.request_id or str(task.task_id))
        try:
            await self._run_claimed(task, job_id, worker_id)
        except LeaseLost as exc:
            log.warning("task %s: %s; the run is the sweep's to recover", task.task_id, exc)
        finally:
            request_id_var.reset(token)

    async def _run_claimed(self, task: Task, job_id: int | None, worker_id: int | None) -> None:
        await self.cache.invalidate(task.task_id, version_of(task.updated_at))
        operation = self.registry.find(task.operation)
        if operation is None:
            await self._wait_for_operation(task, worker_id)
            return
        if task.attempts > 1:
            await self._wait_for_earlier_attempt(task)
        await self.lease.wait_valid(worker_id)
        log.info("task %s started: %s, attempt %s of %s", task.task_id, task.operation, task.attempts, task.max_attempts)
        ctx = TaskContext(
            task_id=task.task_id,
            attempt=task.attempts,
            max_attempts=task.max_attempts,
            request_id=task.request_id,
            compute_seconds=self.settings.compute_seconds,
            progress_sink=ProgressWriter(self, task, asyncio.get_running_loop()).report,
        )
        self.metrics.started(task.operation, task.scheduled_at, task.started_at)
        try:
            result = await self._execute_timed(task, operation, ctx, job_id)
        except asyncio.CancelledError:
            # A shutdown past its grace period, a cancellation of the task, or
            # the lease's fence. The handler is dead by now, unless it is a
            # thread abandoned at shutdown, whose task the sweep releases once
            # this process is gone.
            ctx.stop_event.set()
            current = asyncio.current_task()
            if current in self._fenced_runs:
                self._fenced_runs.discard(current)
                self.metrics.handler_stopped(task.operation, "crash")
                await self._fail(task, "the handler was stopped: its worker's lease lapsed", retry=True, worker_id=worker_id)
                return
            self.metrics.finished(task.operation, "interrupted")
            if job_id in self.abandoned_jobs:
                log.warning("task %s: its handler thread cannot be stopped; released once this worker exits", task.task_id)
                raise
            # A cancelled task is no longer running, so this release is a no-op;
            # a task cut short by shutdown gets its attempt back.
            released = await self._write(
                ledger.task_release, task.task_id, task.attempts, "interrupted by worker shutdown; attempt not counted",
                worker_id=worker_id,
            )
            if released is not None:
                log.warning("task %s interrupted by shutdown; re-queued with its attempt back", task.task_id)
            else:
                log.info("task %s was cancelled while running", task.task_id)
            raise
        except AttemptStopped as exc:
            self.metrics.handler_stopped(task.operation, exc.kind)
            await self._fail(task, str(exc), retry=True, worker_id=worker_id)
        except PermanentError as exc:
            await self._fail(task, _describe(exc), retry=False, worker_id=worker_id)
        except Exception as exc:
            await self._fail(task, _describe(exc), retry=True, worker_id=worker_id)
        else:
            await self._complete(task, result, job_id, worker_id)

    async def _execute_timed(self, task: Task, operation: Operation, ctx: TaskContext, job_id: int | None) -> Any:
        started = time.monotonic()
        try:
            result = await self._execute(task, operation, ctx, job_id)
        except BaseException:
            self.metrics.ran(task.operation, time.monotonic() - started, ok=False)
            raise
        self.metrics.ran(task.operation, time.monotonic() - started, ok=True)
        return result

    async def _execute(self, task: Task, operation: Operation, ctx: TaskContext, job_id: int | None) -> Any:
        # Rows inserted with psql never passed the API's check.
        handler = self.registry.check(task.operation, task.payload)
        timeout = self.time_limit(task, operation)
        if operation.isolation == "process":
            memory_mb = operation.memory_mb if operation.memory_mb is not None else self.settings.handler_memory_mb
            call = Call(
                task.operation, task.payload, task.task_id, task.attempts, task.max_attempts,
                task.request_id, ctx.compute_seconds, memory_mb, self.settings.progress_interval_seconds,
            )
            return await self.processes.run(call, timeout, ctx.report_progress)
        if operation.isolation == "thread":
            return await self._in_thread(handler, task.payload, ctx, timeout, job_id)
        limit = asyncio.timeout(timeout)
        run = asyncio.current_task()
        self._async_runs.add(run)
        try:
            async with limit:
                return await handler(task.payload, ctx)
        except TimeoutError:
            if not limit.expired():
                raise
            raise AttemptStopped("timeout", f"the handler hit its time limit of {timeout:g}s and was cancelled") from None
        finally:
            self._async_runs.discard(run)

    def time_limit(self, task: Task, operation: Operation) -> float | None:
        """The task's own limit, else its operation's, else the worker's default; None for none."""
        for limit in (task.timeout_seconds, operation.timeout_seconds, self.settings.handler_timeout_seconds):
            if limit is not None:
                return limit or None
        return None

    async def _in_thread(
        self,
        handler: Callable[..., Any],
        payload: dict[str, Any],
        ctx: TaskContext,
        timeout: float | None,
        job_id: int | None,
    ) -> Any:
        with self._count_lock:
            self.in_flight += 1
        loop = asyncio.get_running_loop()
        running = loop.run_in_executor(self.executor, self._call_counted, handler, payload, ctx)
        try:
            done, _ = await asyncio.wait({running}, timeout=timeout)
        except asyncio.CancelledError:
            # A thread cannot be killed: ask it to stop. A cancelled task keeps
            # its job running until the thread has returned, so that a retry
            # never overlaps it; at shutdown the thread is abandoned instead,
            # and its task released only after the process has exited.
            ctx.stop_event.set()
            while not running.done():
                if self.shutting_down and job_id is not None:
                    self.abandoned_jobs.add(job_id)
                    raise
                try:
                    await asyncio.wait({running})
                except asyncio.CancelledError:
                    continue
            raise
        if done:
            return running.result()
        # Past its time limit: ask it to stop, and end the attempt only once
        # it has, so that a retry never overlaps it.
        ctx.stop_event.set()
        await asyncio.wait({running})
        raise AttemptStopped("timeout", f"the handler hit its time limit of {timeout:g}s and stopped on request")

    def _call_counted(self, handler: Callable[..., Any], payload: dict[str, Any], ctx: TaskContext) -> Any:
        # Counted in the thread itself: a cancelled run's thread may outlive its task.
        try:
            return handler(payload, ctx)
        finally:
            with self._count_lock:
                self.in_flight -= 1

    async def _complete(self, task: Task, result: Any, job_id: int | None, worker_id: int | None) -> None:
        try:
            json.dumps(result, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            await self._fail(task, f"the handler's result cannot be stored as JSON: {exc}", retry=False, worker_id=worker_id)
            return
        try:
            done = await self.completer.complete(task.task_id, task.attempts, result, job_id)
        except psycopg.DataError:
            # One result the database refuses fails its whole batch: each is then written alone.
            try:
                done = (await self._write_completions([(task.task_id, task.attempts, result, job_id)])).get(task.task_id)
            except psycopg.DataError as exc:
                await self._fail(task, f"the handler's result cannot be stored: {exc}", retry=False, worker_id=worker_id)
                return
        if done is None:
            log.warning("task %s changed while it ran (cancelled or re-queued); result discarded", task.task_id)
            return
        log.info("task %s completed", task.task_id)
        self.metrics.finished(task.operation, "completed")
        await self.cache.put(done.task_id, encode_document(done), done.updated_at)

    async def _fail(self, task: Task, error: str, retry: bool, worker_id: int | None = None) -> None:
        if retry and task.attempts < task.max_attempts:
            delay = self.backoff(task.attempts)
            recorded = await self._write(ledger.task_mark_retry, task.task_id, task.attempts, error, delay, worker_id=worker_id)
            if recorded is not None:
                log.warning("task %s attempt %s failed (%s); retrying in %.1fs", task.task_id, task.attempts, error, delay)
                self.metrics.finished(task.operation, "retried")
            return
        failed = await self._write(ledger.task_mark_failed, task.task_id, task.attempts, error, worker_id=worker_id)
        if failed is None:
            log.warning("task %s changed while it ran; failure not recorded", task.task_id)
            return
        log.warning("task %s failed after %s attempt(s): %s", task.task_id, task.attempts, error)
        self.metrics.finished(task.operation, "failed")
        await self.cache.put(failed.task_id, encode_document(failed), failed.updated_at)

    async def run_interruptible(
        self, raw_task_id: str, claimed: dict[str, Any] | None, job_id: int | None = None, worker_id: int | None = None
    ) -> None:
        """run(), cut short by interrupt()."""
        current = asyncio.current_task()
        self._runs.add(current)
        try:
            await self.run(raw_task_id, claimed, job_id, worker_id)
        finally:
            self._runs.discard(current)

    def interrupt(self) -> int:
        """Cut every running task short now: each is re-queued as on a shutdown past its grace period."""
        for run in self._runs:
            run.cancel()
        return len(self._runs)

    async def _wait_for_earlier_attempt(self, task: Task) -> None:
        """Start a retry only once every earlier attempt of its task has ended, on any worker.

        A cancelled attempt is stopped within a second (a thread handler when
        it returns), but an operator may retry the task sooner. Its job stays
        'doing' until its handler is dead, or until its worker's lease lapses
        (the worker fenced itself by then), so this waits for nothing else.
        """
        delay = 0.02
        while True:
            async with self.pool.connection() as conn:
                if await ledger.task_count_running_jobs(conn, task.task_id) <= 1:
                    return
            if delay == 0.02:
                log.info("task %s: attempt %s waits for an earlier attempt to stop", task.task_id, task.attempts)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _wait_for_operation(self, task: Task, worker_id: int | None) -> None:
        """Put back a task whose operation this worker does not know, for a worker that does.

        In a rolling deploy the API may know an operation before every worker
        does. The task waits, without using up an attempt, for up to
        ASYNCPROC_UNKNOWN_OPERATION_GRACE from its creation, looking again
        after a pause that grows with its age.
        """
        grace = self.settings.unknown_operation_grace_seconds
        age = (task.started_at - task.created_at).total_seconds()
        if age >= grace:
            error = (
                f"unknown operation {task.operation!r}: no worker that knows it took the task within {grace:g}s"
                f" (this worker knows {', '.join(self.registry.names())})"
            )
            await self._fail(task, error, retry=False, worker_id=worker_id)
            return
        delay = max(self.settings.retry_backoff_seconds, min(age / 2, UNKNOWN_OPERATION_MAX_DELAY_SECONDS, grace - age))
        error = f"waiting for a worker that knows operation {task.operation!r}"
        waiting = await self._write(ledger.task_release, task.task_id, task.attempts, error, delay, worker_id=worker_id)
        if waiting is not None:
            log.warning("task %s: operation %r unknown here; put back for %.1fs", task.task_id, task.operation, delay)
            self.metrics.finished(task.operation, "unknown_operation")

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with +-20 % jitter, so that failed tasks spread out."""
        base = self.settings.retry_backoff_seconds * 2 ** (attempt - 1)
        return min(base, self.settings.retry_backoff_max_seconds) * random.uniform(0.8, 1.2)

    async def _write_completions(self, outcomes: list[tuple[UUID, int, Any, int | None]]) -> dict[UUID, Task]:
        recorded = await self._write(ledger.tasks_mark_completed, outcomes)
        self.finished_jobs.update(recorded.finished_jobs)
        return recorded.tasks

    async def _write(self, write: Callable[..., Awaitable[Any]], *args: Any, worker_id: int | None = None) -> Any:
        """Record an outcome, waiting out a database outage: the run already happened.

        It waits for as long as the run's lease is not lost: once the sweep
        has pruned the worker, the task is re-queued and the outcome's attempt
        fence would refuse it anyway.
        """
        delay = 0.2
        while True:
            try:
                async with self.pool.connection() as conn:
                    return await write(conn, *args)
            except (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout) as exc:
                if worker_id is not None and worker_id != self.lease.worker_id:
                    raise LeaseLost(f"the lease of worker {worker_id} was lost; outcome not recorded") from exc
                log.warning("database unavailable while recording %s (%s); retrying", write.__name__, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


class ProgressWriter:
    """Writes a task's progress at most once per interval, never blocking the handler."""

    def __init__(self, runner: Runner, task: Task, loop: asyncio.AbstractEventLoop):
        self._runner = runner
        self._task = task
        self._loop = loop
        self._interval = runner.settings.progress_interval_seconds
        self._last_write = -math.inf
        self._lock = threading.Lock()
        self._writes: set[asyncio.Task] = set()

    def report(self, percent: int, message: str | None) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last_write < self._interval:
                return
            self._last_write = now
        # Handlers run in threads and on the loop alike; the write runs on the loop.
        self._loop.call_soon_threadsafe(self._start_write, percent, message)

    def _start_write(self, percent: int, message: str | None) -> None:
        write = self._loop.create_task(self._write(percent, message))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)

    async def _write(self, percent: int, message: str | None) -> None:
        try:
            async with self._runner.pool.connection() as conn:
                await ledger.task_set_progress(conn, self._task.task_id, self._task.attempts, percent, message)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            log.warning("progress of task %s not recorded: %s", self._task.task_id, exc)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    # An exception raised in a handler's process arrives as its type's name and text.
    name = exc.type_name if isinstance(exc, HandlerError) else type(exc).__name__
    message = f"{name}: {text}" if text else name
    return message[:MAX_ERROR_CHARS]
