"""The worker process: open the pool, run Procrastinate, survive the database going away.

The worker holds a lease (worker/lease.py) from before its first fetch until
after its last run has ended, and fences itself when it cannot renew it. It
restarts its Procrastinate worker after a short pause whenever it stops on an
error, breaks its connections when the database stops answering on them (a
half-open connection), and sweeps: a task whose worker died is re-queued or,
with no attempt left, failed, and the tasks and jobs tables are reconciled. It also keeps the ledger's counts, history and retention
(worker/pruner.py). The sweep, the watchdog and the ledger upkeep are
supervised loops (asyncproc.loops):
any error is logged and the loop goes on, and the metrics say when one keeps
failing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import psycopg_pool

from asyncproc import db, ledger
from asyncproc.cache import AsyncResultCache
from asyncproc.config import DatabaseSettings, Settings, WorkerSettings
from asyncproc.loops import LoopHealth, run_periodically, wait_or_stop
from asyncproc.operations import load_user_module, registry
from worker.app import ABORT_POLL_SECONDS, QUEUE, build_app
from worker.callbacks import deliver_callbacks
from worker.lease import Lease, LeaseLost
from worker.metrics import WorkerMetrics
from worker.pool import ProcessPool
from worker.pruner import LedgerUpkeep, upkeep_period
from worker.runner import Runner
from worker.scheduler import enqueue_schedules

log = logging.getLogger(__name__)

RESTART_DELAY_SECONDS = 1.0
# A Procrastinate worker that ran this long before it stopped was not failing in a row.
HEALTHY_RUN_SECONDS = 60.0
# The exit code of a worker that ended itself because its lease lapsed while
# handlers ran that only its end could stop (EX_TEMPFAIL: a supervisor starts it again).
FENCED_EXIT = 75
# How long the fence waits for cancelled async handlers before it ends the process.
ASYNC_FENCE_SECONDS = 1.0


def run(settings: Settings, concurrency: int, metrics_port: int | None = None) -> int:
    """Run a worker until SIGTERM or SIGINT; returns the exit code."""
    load_user_module(settings.operations_module)
    log.info("operations: %s", ", ".join(registry.names()))
    metrics = WorkerMetrics()
    if metrics_port is not None:
        metrics.serve(metrics_port)
    # Sized to the concurrency: the loop's default pool would cap sync handlers
    # at min(32, cpus + 4) running at once.
    executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="handler")
    abandoned = asyncio.run(_serve(settings, concurrency, executor, metrics))
    if abandoned:
        # Handler threads cannot be interrupted: only the process's end stops
        # them, and their tasks are released once its lease has lapsed.
        log.warning("exiting with %s handler thread(s) still running; their tasks are released once this worker's lease lapses", abandoned)
        logging.shutdown()
        os._exit(0)
    executor.shutdown(wait=True)
    return 0


async def _serve(settings: Settings, concurrency: int, executor: ThreadPoolExecutor, metrics: WorkerMetrics) -> int:
    """Serve until asked to stop; returns how many handler threads are still running."""
    processes = ProcessPool(settings.operations_module, concurrency)
    runner: Runner | None = None

    def fence(why: str) -> None:
        # From the lease's thread: the event loop may be the thing that is stuck.
        killed = processes.kill_all()
        if runner is not None and runner.in_flight:
            _exit_fenced(f"lease {why} with {runner.in_flight} thread handler(s) running, which only the process's end stops")
        if runner is not None and runner.async_running:
            stopped = threading.Event()
            loop.call_soon_threadsafe(runner.stop_async_handlers, stopped)
            if not stopped.wait(ASYNC_FENCE_SECONDS):
                _exit_fenced(f"lease {why} and async handlers did not stop within {ASYNC_FENCE_SECONDS:g}s of their cancel")
        log.error("lease %s: killed %s running handler process(es)", why, killed)

    loop = asyncio.get_running_loop()
    lease = Lease(settings.db, settings.worker, fence)
    lease.deadline_sinks.append(processes.set_lease_deadline)
    stopping = asyncio.Event()
    # Signals that come before the worker can stop gracefully: each is kept,
    # and acted on once it can (request_stop below), never dropped.
    requested: list[int] = []

    def stop_before_start(signum: int) -> None:
        requested.append(signum)
        lease.stop_acquiring()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_before_start, signum)
    try:
        await asyncio.to_thread(lease.acquire)
    except LeaseLost:
        log.info("worker stopped before it started")
        return 0
    if requested:
        # Asked to stop while the registration was under way: it ended by registering.
        lease.release()
        log.info("worker stopped before it started")
        return 0
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, requested.append, signum)
    lease.start()
    pool = db.async_pool(settings.db, "asyncproc-worker", min(concurrency, settings.db.pool_size) + 2)
    await pool.open(wait=False)
    cache = AsyncResultCache(settings.cache.url, settings.cache.result_ttl_seconds)
    await processes.open()
    runner = Runner(settings.worker, pool, cache, registry, executor, processes, lease, metrics)
    app = build_app(runner, concurrency)

    worker_task: asyncio.Task | None = None

    def request_stop(signum: int) -> None:
        if stopping.is_set():
            # A second Ctrl-C, or `asyncproc up` passing one on: stop now.
            log.warning("received %s again: stopping now; re-queueing %s running task(s)", signal.Signals(signum).name, runner.interrupt())
            return
        log.info(
            "received %s: finishing running tasks (grace %ss; a second signal stops at once)",
            signal.Signals(signum).name,
            settings.worker.shutdown_grace_seconds,
        )
        stopping.set()
        runner.shutting_down = True
        app.job_manager.stop_fetching()
        if worker_task is not None:
            worker_task.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, request_stop, signum)
    for signum in requested:
        request_stop(signum)

    loops = [
        (LoopHealth("sweep"), lambda: _sweep(settings.worker, pool), sweep_period(settings.worker)),
        (
            LoopHealth("database watchdog"),
            lambda: _probe_database(settings.db, pool),
            settings.worker.heartbeat_seconds,
        ),
        (
            LoopHealth("ledger upkeep"),
            LedgerUpkeep(settings.retention, pool, stopping).step,
            upkeep_period(settings.retention),
        ),
        (LoopHealth("scheduler"), lambda: enqueue_schedules(settings.worker, pool), settings.worker.scheduler_poll_seconds),
        (LoopHealth("callbacks"), lambda: deliver_callbacks(settings.callbacks, pool), settings.callbacks.poll_seconds),
    ]
    for health, _, _ in loops:
        metrics.watch_loop(health)
    supervised = [
        asyncio.create_task(run_periodically(health, step, period, stopping), name=health.name)
        for health, step, period in loops
    ]
    dispatch = LoopHealth("procrastinate worker")
    metrics.watch_loop(dispatch)
    log.info("worker started: concurrency %s, queue %s", concurrency, QUEUE)
    abandoned = 0
    try:
        while not stopping.is_set():
            worker_task = asyncio.create_task(_run_procrastinate(app, pool, settings.worker, concurrency))
            started = time.monotonic()
            try:
                await worker_task
            except asyncio.CancelledError:
                if not stopping.is_set():
                    raise
            except Exception as exc:
                if time.monotonic() - started > HEALTHY_RUN_SECONDS:
                    dispatch.succeeded()
                dispatch.failed(exc)
            if not stopping.is_set():
                log.info("procrastinate worker stopped; restarting it in %ss", RESTART_DELAY_SECONDS)
                await wait_or_stop(stopping, RESTART_DELAY_SECONDS)
        abandoned = await _abandon(runner, pool, lease)
    finally:
        for loop_task in supervised:
            loop_task.cancel()
        await asyncio.gather(*supervised, return_exceptions=True)
        await processes.close()
        await pool.close(timeout=5)
        await cache.close()
    # Every handler process is dead now: the lease can go, or lapse for the threads.
    if abandoned:
        await asyncio.to_thread(lease.lapse_soon)
    else:
        await asyncio.to_thread(lease.release)
    log.info("worker stopped")
    return runner.in_flight


def _exit_fenced(why: str) -> None:
    log.critical("%s: exiting", why)
    logging.shutdown()
    os._exit(FENCED_EXIT)


async def _abandon(runner: Runner, pool: db.SeverableAsyncPool, lease: Lease) -> int:
    """Mark the jobs of thread handlers that outlive this worker, for the sweep to release after it; how many."""
    job_ids = sorted(runner.abandoned_jobs)
    if not job_ids:
        return 0
    delay = 0.1
    while lease.worker_id is not None:
        try:
            async with pool.connection() as conn:
                await ledger.jobs_abandon(conn, job_ids)
            break
        except (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout) as exc:
            # Unmarked, the runs count as lost when the lease lapses: the rule for a crash.
            if not lease.valid():
                log.warning("could not mark %s abandoned job(s) (%s): they count as lost", len(job_ids), db.describe_error(exc))
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
    return len(job_ids)


async def _run_procrastinate(app, pool: db.SeverableAsyncPool, settings: WorkerSettings, concurrency: int) -> None:
    async with app.open_async(pool):
        await app.run_worker_async(
            queues=[QUEUE],
            concurrency=concurrency,
            install_signal_handlers=False,
            delete_jobs="successful",
            listen_notify=True,
            fetch_job_polling_interval=settings.poll_seconds,
            abort_job_polling_interval=ABORT_POLL_SECONDS,
            shutdown_graceful_timeout=settings.shutdown_grace_seconds,
            update_heartbeat_interval=settings.heartbeat_seconds,
            stalled_worker_timeout=settings.stalled_seconds,
        )


def sweep_period(settings: WorkerSettings) -> float:
    return max(1.0, min(settings.stalled_seconds / 3, 10.0))


def stalled_recovery_bound(settings: WorkerSettings) -> float:
    """The longest a killed worker's task stays `running` while another worker sweeps.

    The dead worker's last heartbeat is no older than its death, so it is
    pruned stalled_seconds later at most, and the next sweep re-queues its task.
    """
    return settings.stalled_seconds + sweep_period(settings)


async def _sweep(settings: WorkerSettings, pool: db.SeverableAsyncPool) -> None:
    async with pool.connection() as conn:
        report = await ledger.tasks_sweep(conn, settings.stalled_seconds)
    if report.requeued or report.failed:
        log.warning(
            "worker lost: re-queued %s task(s), failed %s with no attempt left", report.requeued, report.failed
        )
    if report.redeferred or report.dropped:
        log.warning(
            "reconciled: queued %s pending task(s) that had no job or a stale one, dropped %s stray job(s)",
            report.redeferred,
            report.dropped,
        )


async def _probe_database(settings: DatabaseSettings, pool: db.SeverableAsyncPool) -> None:
    """Break every connection when the database stops answering on them.

    A connection cut without a FIN or RST (a dead NAT entry, a partition) leaves
    queries waiting forever, Procrastinate's included. Failing them makes every
    part of the worker reconnect through its usual error path.
    """
    try:
        async with asyncio.timeout(settings.response_timeout):
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
    except TimeoutError:
        severed = pool.sever()
        log.warning(
            "the database did not answer within %ss; broke %s connection(s) to reconnect",
            settings.response_timeout,
            severed,
        )
