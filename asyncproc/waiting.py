"""Long polls (?wait) and event streams (/events), parked on an event loop.

A waiting client costs no thread: under `asyncproc api` its request is parked
on the event loop of gunicorn's asyncio worker (see asyncproc.api.asgi), which
wakes it when the task-change listener announces the task. A database read,
when there is something to read, borrows one of a few reader threads.

Each process admits at most ASYNCPROC_MAX_WAITERS waiting clients, and at most
ASYNCPROC_MAX_WAITERS_PER_KEY for one API key (or client address when access
control is off); beyond them a client is told when to come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator
from uuid import UUID

import psycopg_pool

from asyncproc import ledger, service
from asyncproc.cache import ResultCache
from asyncproc.db import translate_errors
from asyncproc.errors import DatabaseUnavailable, TooManyWaiters, WaitersFull
from asyncproc.task_events import TaskEvents, Wakeable

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 15.0
# The claim of a task is not announced (see the tasks_notify_changed trigger),
# so one thread per process reads every streamed task this often, in one query,
# and wakes the streams whose task changed; while the listener is away, it
# reads the long polls' tasks too. Thousands of waiters cost one query a second.
POLL_SECONDS = 1.0
# What a client is told to wait before trying again when the waiters are full.
RETRY_AFTER_SECONDS = 5
# An event stream that ends at its maximum length asks the client to reconnect after this.
STREAM_RETRY_MILLISECONDS = 1000
READER_THREADS = 4


@dataclass
class Parked:
    """A response body produced later on an event loop; `release` frees the waiter's place."""

    chunks: AsyncIterator[bytes]
    release: Callable[[], None]


class _LoopEvent:
    """An asyncio.Event that the listener thread may set."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.event = asyncio.Event()

    def set(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self.event.set)
        except RuntimeError:
            # Its loop has closed (a request served without our server has ended):
            # there is nobody left to wake.
            pass


def event_id(document: bytes) -> str:
    """The SSE id of a document: equal ids mean an unchanged document (Last-Event-ID)."""
    return hashlib.blake2b(document, digest_size=8).hexdigest()


class Waiters:
    def __init__(
        self,
        pool: psycopg_pool.ConnectionPool,
        cache: ResultCache,
        events: TaskEvents,
        max_waiters: int,
        max_waiters_per_key: int,
        stream_max_seconds: float,
    ):
        self._pool = pool
        self._cache = cache
        self._events = events
        self._max = max_waiters
        self._max_per_key = max_waiters_per_key
        self._stream_max_seconds = stream_max_seconds
        self._lock = threading.Lock()
        self._count = 0
        self._per_key: Counter[str] = Counter()
        self._readers = ThreadPoolExecutor(READER_THREADS, thread_name_prefix="waiter-read")
        self._stopping = False
        # Per task, each waiter's wake-up and the id of the last document it saw;
        # streams in one, long polls in the other.
        self._streams: dict[UUID, dict[Wakeable, str | None]] = defaultdict(dict)
        self._polls: dict[UUID, dict[Wakeable, str | None]] = defaultdict(dict)
        self._closed = threading.Event()
        threading.Thread(target=self._poll_forever, name="waiter-poll", daemon=True).start()

    @property
    def count(self) -> int:
        return self._count

    def stop_waiting(self) -> None:
        """The server is stopping: long polls answer now with the task as it is,
        and streams end with `retry:`, so that clients come back to another process."""
        self._stopping = True
        self._events.wake_everyone()

    def close(self) -> None:
        self._closed.set()
        self._readers.shutdown(wait=False, cancel_futures=True)

    def admit(self, key: str) -> Callable[[], None]:
        """Take a waiter's place for `key`, or raise; returns the function that gives it back."""
        with self._lock:
            if self._count >= self._max:
                raise WaitersFull(
                    f"This API process already holds {self._max} waiting clients; retry later",
                    RETRY_AFTER_SECONDS,
                )
            if self._per_key[key] >= self._max_per_key:
                raise TooManyWaiters(
                    f"At most {self._max_per_key} waiting requests per client; retry later",
                    RETRY_AFTER_SECONDS,
                )
            self._count += 1
            self._per_key[key] += 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                self._count -= 1
                self._per_key[key] -= 1
                if not self._per_key[key]:
                    del self._per_key[key]

        return release

    async def _lookup(self, task_id: UUID, owner: int | None) -> tuple[bytes, bool]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, service.lookup, self._pool, self._cache, task_id, owner)

    async def wait_for_result(self, task_id: UUID, seconds: float, owner: int | None) -> AsyncIterator[bytes]:
        """Yields the task's document once: as soon as it is finished, or after `seconds`."""
        deadline = time.monotonic() + seconds
        changed = _LoopEvent()
        with self._events.watch(task_id, changed), self._polled(self._polls, task_id, changed) as seen:
            document, finished = await self._lookup(task_id, owner)
            while not finished and not self._stopping and (remaining := deadline - time.monotonic()) > 0:
                seen(event_id(document))
                await _wait(changed.event, remaining)
                document, finished = await self._lookup(task_id, owner)
        yield document

    async def stream_changes(
        self, task_id: UUID, owner: int | None, last_event_id: str | None
    ) -> AsyncIterator[bytes]:
        """SSE: an event whenever the document changes, until it is finished or the
        stream reaches its maximum length, which ends with a `retry:` so that the
        client reconnects with Last-Event-ID and misses nothing."""
        ends_at = time.monotonic() + self._stream_max_seconds
        changed = _LoopEvent()
        sent = last_event_id
        with self._events.watch(task_id, changed), self._polled(self._streams, task_id, changed) as seen:
            quiet_since = time.monotonic()
            while True:
                document, finished = await self._lookup(task_id, owner)
                if event_id(document) != sent:
                    sent = event_id(document)
                    seen(sent)
                    quiet_since = time.monotonic()
                    yield f"id: {sent}\nevent: task\ndata: ".encode() + document + b"\n\n"
                elif time.monotonic() - quiet_since >= KEEPALIVE_SECONDS:
                    quiet_since = time.monotonic()
                    yield b": keepalive\n\n"
                if finished:
                    return
                remaining = ends_at - time.monotonic()
                if remaining <= 0 or self._stopping:
                    yield f"retry: {STREAM_RETRY_MILLISECONDS}\n\n".encode()
                    return
                keepalive_due = KEEPALIVE_SECONDS - (time.monotonic() - quiet_since)
                await _wait(changed.event, min(keepalive_due, remaining))

    @contextlib.contextmanager
    def _polled(
        self, watched: dict[UUID, dict[Wakeable, str | None]], task_id: UUID, changed: Wakeable
    ) -> Iterator[Callable[[str], None]]:
        """Register with the poller; yields how to tell it which document was seen."""

        def seen(document_id: str) -> None:
            with self._lock:
                watched[task_id][changed] = document_id

        with self._lock:
            watched[task_id][changed] = None
        try:
            yield seen
        finally:
            with self._lock:
                del watched[task_id][changed]
                if not watched[task_id]:
                    del watched[task_id]

    def _poll_forever(self) -> None:
        while not self._closed.wait(POLL_SECONDS):
            with self._lock:
                groups = [self._streams] if self._events.connected else [self._streams, self._polls]
                watched: dict[UUID, dict[Wakeable, str | None]] = defaultdict(dict)
                for group in groups:
                    for task_id, waiters in group.items():
                        watched[task_id].update(waiters)
            if not watched:
                continue
            try:
                with translate_errors(), self._pool.connection() as conn:
                    tasks = ledger.tasks_get_many(conn, list(watched))
            except DatabaseUnavailable as exc:
                # Waiters keep what they have; the next round tries again.
                log.debug("the waiter poller cannot read the database: %s", exc.message)
                continue
            current = {task.task_id: event_id(service.encode_document(task)) for task in tasks}
            for task_id, waiters in watched.items():
                for changed, seen in waiters.items():
                    if current.get(task_id) != seen:
                        changed.set()


async def _wait(event: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        pass
    event.clear()


def run_blocking(parked: Parked) -> Iterator[bytes]:
    """The body of a parked response driven from a thread, for servers without an
    event loop of ours (Flask's test client, any WSGI server)."""
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(anext(parked.chunks))
            except StopAsyncIteration:
                return
    finally:
        try:
            loop.run_until_complete(parked.chunks.aclose())
        finally:
            loop.close()
            parked.release()
