"""The worker's lease: the right to run tasks, renewed by threads of its own, and the fence when it lapses.

A worker may run a task only while it holds a live lease, and nobody else may
take that task until the lease has expired. The lease is the worker's row in
procrastinate_workers: the sweep prunes a row whose heartbeat is older than
ASYNCPROC_STALLED_SECONDS (S) and re-queues the tasks of its jobs.

The lease is renewed every ASYNCPROC_HEARTBEAT_SECONDS (H) by a thread of its
own, not by Procrastinate's run loop, so that it keeps renewing through a
graceful shutdown, a restart of the fetch loop, and a busy event loop. A
renewal that fails is tried again every RETRY_SECONDS.

The fence. A worker whose last successful renewal began more than S - H
seconds ago stops its own handlers: a watchdog thread kills every handler
process, and ends the worker's process if a thread or async handler is
running, which nothing else can stop. Each handler process also watches the
same deadline (shared memory, worker/pool.py) and ends itself, so a frozen
worker cannot leave a handler running. The sweep cannot take the tasks over
before S has passed since that renewal began (its heartbeat is the
renewal's own now()), which leaves H for the kill: `Settings` refuses
settings where S < 2H + 1 (one missed renewal and one second to spare).

A lease the sweep pruned meanwhile is lost for good: its runs were fenced,
their tasks re-queued, and the worker registers a new lease to go on with.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import threading
import time
from typing import Callable

import psycopg

from asyncproc import db, migrate
from asyncproc.config import DatabaseSettings, WorkerSettings

log = logging.getLogger(__name__)

RETRY_SECONDS = 0.5
# A worker that exits with thread handlers it cannot stop lets its lease lapse
# this long after its last statement; the process is gone long before.
EXIT_LAPSE_SECONDS = 2.0


def fence_seconds(settings: WorkerSettings) -> float:
    """How long after the start of its last successful renewal a worker stops its handlers."""
    return settings.stalled_seconds - settings.heartbeat_seconds


class LeaseLost(Exception):
    """The run's lease lapsed: another worker may run its task now."""


class Lease:
    def __init__(self, database: DatabaseSettings, settings: WorkerSettings, on_fence: Callable[[str], None]):
        self._database = database
        self._settings = settings
        self._on_fence = on_fence
        self._fence_after = fence_seconds(settings)
        self._lock = threading.Condition()
        self._worker_id: int | None = None
        # Monotonic: until when this worker's handlers may run.
        self._valid_until = -math.inf
        self._fenced = False
        self._stopping = threading.Event()
        self._conn: psycopg.Connection | None = None
        self._threads: list[threading.Thread] = []
        # Called with each new deadline (the handler processes' shared copy).
        self.deadline_sinks: list[Callable[[float], None]] = []

    # -- reading it, from any thread -------------------------------------------

    @property
    def worker_id(self) -> int | None:
        return self._worker_id

    def valid(self) -> bool:
        return time.monotonic() < self._valid_until

    def held_by(self, worker_id: int | None) -> bool:
        """Whether a run fetched under `worker_id` still holds the lease."""
        return worker_id is not None and worker_id == self._worker_id and self.valid()

    async def wait_valid(self, worker_id: int | None) -> None:
        """Return once the run's lease is valid; LeaseLost if it was lost meanwhile."""
        delay = 0.05
        while not self.held_by(worker_id):
            if worker_id != self._worker_id:
                raise LeaseLost(f"the lease of worker {worker_id} was lost")
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_SECONDS)

    # -- its life ----------------------------------------------------------------

    def acquire(self) -> int:
        """Register a lease, trying until the database answers; its worker id (blocking).

        MigrationError when the database's schema does not serve this release: checked
        here, where the worker first reaches its database, and not again when a lost
        lease is registered anew, which a running worker must survive.
        """
        while True:
            try:
                migrate.check_schema_serves_this_code(self._connected())
                return self._register()
            except psycopg.Error as exc:
                log.warning("lease: cannot register (%s); retrying", db.describe_error(exc))
                self._close()
                if self._stopping.wait(RETRY_SECONDS):
                    raise LeaseLost("stopped before a lease was registered") from exc

    def stop_acquiring(self) -> None:
        """Make acquire() give up: the worker was asked to stop before it had a lease."""
        self._stopping.set()

    def start(self) -> None:
        for target, name in ((self._renew_forever, "lease-renewal"), (self._watch, "lease-fence")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def release(self) -> None:
        """Stop renewing and delete the row: every run of this worker has ended and been recorded."""
        self._stop_threads()
        worker_id = self._worker_id
        try:
            self._execute("lease_release", worker_id=worker_id)
        except psycopg.Error as exc:
            # The row lapses by itself; its worker has no runs left.
            log.warning("lease: could not unregister worker %s (%s)", worker_id, db.describe_error(exc))
        self._close()

    def lapse_soon(self) -> None:
        """Stop renewing and let the lease lapse EXIT_LAPSE_SECONDS from now: the process exits now."""
        self._stop_threads()
        try:
            self._execute(
                "lease_shorten",
                worker_id=self._worker_id,
                stalled_seconds=self._settings.stalled_seconds,
                seconds=EXIT_LAPSE_SECONDS,
            )
        except psycopg.Error as exc:
            log.warning("lease: could not shorten (%s); it lapses by itself", db.describe_error(exc))
        self._close()

    def _stop_threads(self) -> None:
        self._stopping.set()
        with self._lock:
            self._lock.notify_all()
        for thread in self._threads:
            thread.join()

    # -- the threads ---------------------------------------------------------------

    def _register(self) -> int:
        began = time.monotonic()
        row = self._execute("lease_register", host=socket.gethostname(), pid=os.getpid())
        worker_id = row["worker_id"]
        with self._lock:
            self._worker_id = worker_id
            self._extend(began)
        log.info("lease: registered as worker %s (fence %.1fs after a renewal)", worker_id, self._fence_after)
        return worker_id

    def _renew_forever(self) -> None:
        delay = self._settings.heartbeat_seconds
        while not self._stopping.wait(delay):
            began = time.monotonic()
            try:
                row = self._execute("lease_renew", worker_id=self._worker_id)
            except psycopg.Error as exc:
                log.warning("lease: renewal failed (%s); retrying", db.describe_error(exc))
                self._close()
                delay = RETRY_SECONDS
                continue
            if row is None:
                self._lose()
                delay = RETRY_SECONDS
                continue
            with self._lock:
                self._extend(began)
                if self._fenced:
                    log.warning("lease: renewed again after its fence; running tasks again")
                    self._fenced = False
            delay = self._settings.heartbeat_seconds

    def _lose(self) -> None:
        """The sweep pruned this worker: fence now, then take a new lease."""
        log.error("lease: worker %s was pruned as stalled; its runs are fenced and its tasks re-queued", self._worker_id)
        with self._lock:
            self._valid_until = -math.inf
            self._publish()
        self._fence("lost")
        try:
            self._register()
        except psycopg.Error as exc:
            log.warning("lease: cannot register again (%s); retrying", db.describe_error(exc))
            self._close()

    def _watch(self) -> None:
        with self._lock:
            while not self._stopping.is_set():
                remaining = self._valid_until - time.monotonic()
                if remaining > 0 or self._fenced:
                    self._lock.wait(remaining if remaining > 0 else None)
                    continue
                self._fenced = True
                self._lock.release()
                try:
                    self._fence("expired")
                finally:
                    self._lock.acquire()

    def _fence(self, why: str) -> None:
        log.error(
            "lease: %s (no renewal for %.1fs): stopping this worker's handlers before another worker may take its tasks",
            why,
            self._fence_after,
        )
        self._on_fence(why)

    def _extend(self, began: float) -> None:
        # Called with the lock held. Measured from the renewal's start: the
        # database's heartbeat, taken during the renewal, is no earlier.
        self._valid_until = began + self._fence_after
        self._publish()
        self._lock.notify_all()

    def _publish(self) -> None:
        for sink in self.deadline_sinks:
            sink(self._valid_until)

    # -- the connection --------------------------------------------------------------

    def _statement_seconds(self) -> float:
        # A statement that takes longer than a heartbeat is as good as failed.
        return max(0.1, self._settings.heartbeat_seconds)

    def _connected(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            timeout = self._statement_seconds()
            kwargs = db.connect_kwargs(self._database, "asyncproc-worker-lease")
            kwargs["connect_timeout"] = max(1, math.ceil(timeout))
            timeout_ms = int(timeout * 1000)
            self._conn = psycopg.connect(
                self._database.url,
                autocommit=True,
                options=f"{db.NO_JIT} -c statement_timeout={timeout_ms} -c lock_timeout={timeout_ms}",
                **kwargs,
            )
        return self._conn

    def _execute(self, name: str, **params: object) -> dict | None:
        conn = self._connected()
        # The server's timeouts cannot end a wait on a connection cut
        # silently, so the socket is shut down under it, which fails it at once.
        watchdog = threading.Timer(self._statement_seconds(), db.sever_connection, (conn,))
        watchdog.start()
        try:
            return conn.execute(db.query(name), params).fetchone()
        finally:
            watchdog.cancel()

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
