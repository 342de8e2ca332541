"""Group commit for POST /process: the tasks that concurrent requests of one API process submit together share one INSERT and one commit.

Alone, each request paid for a statement and a commit (a WAL flush) of its
own, and at 16 connections those, not the HTTP layer, bounded the API
(docs/performance.md). Here the first request to arrive writes at once, with
no lingering, so a lone client waits for nothing; the requests that arrive
while a write is in flight go together in the next one, written by the first
of them. Each request returns only once the commit that holds its row is
done, so a 202 still means stored and queued.

One refused row (a constraint) must not fail the others: a refused group is
written again one request at a time, so that each gets its own answer. A
lost database fails the whole group, as it would each request alone.
"""

from __future__ import annotations

import threading

import psycopg
import psycopg_pool

from asyncproc import ledger
from asyncproc.ledger import NewTask, Task

# One statement stays a few milliseconds; an API process has far fewer request threads.
MAX_GROUP = 100


class _Request:
    __slots__ = ("new", "task", "error", "finished", "leads", "wake")

    def __init__(self, new: NewTask):
        self.new = new
        self.task: Task | None = None
        self.error: BaseException | None = None
        self.finished = False
        self.leads = False
        self.wake = threading.Event()


class GroupCommit:
    def __init__(self, pool: psycopg_pool.ConnectionPool, max_group: int = MAX_GROUP):
        self._pool = pool
        self._max_group = max_group
        self._lock = threading.Lock()
        self._queued: list[_Request] = []
        self._writing = False
        # Statements written, for tests to see that requests shared them.
        self.writes = 0

    def insert(self, new: NewTask) -> Task | None:
        """Insert and queue one task, committed on return; None when its Idempotency-Key is taken."""
        request = _Request(new)
        with self._lock:
            self._queued.append(request)
            if not self._writing:
                self._writing = True
                request.leads = True
        while not request.finished:
            if request.leads:
                request.leads = False
                self._write_next_group()
            else:
                request.wake.wait()
                request.wake.clear()
        if request.error is not None:
            raise request.error
        return request.task

    def _write_next_group(self) -> None:
        with self._lock:
            group, self._queued = self._queued[: self._max_group], self._queued[self._max_group :]
        try:
            self._write(group)
        except BaseException as exc:
            # Not a database answer (those are each request's own, in _write): every request hears of it.
            for request in group:
                request.error = exc
        finally:
            with self._lock:
                if self._queued:
                    # The next group's first request writes it, from its own thread.
                    self._queued[0].leads = True
                    self._queued[0].wake.set()
                else:
                    self._writing = False
            for request in group:
                request.finished = True
                request.wake.set()

    def _write(self, group: list[_Request]) -> None:
        self.writes += 1
        try:
            with self._pool.connection() as conn:
                if len(group) == 1:
                    group[0].task = ledger.task_insert(conn, group[0].new)
                    return
                inserted = ledger.tasks_insert_many(conn, [request.new for request in group])
        except (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout) as exc:
            for request in group:
                request.error = exc
            return
        except psycopg.Error as exc:
            if len(group) == 1:
                group[0].error = exc
                return
            for request in group:
                self._write([request])
            return
        for request, task in zip(group, inserted):
            request.task = task
