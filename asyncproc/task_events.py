"""One LISTEN connection per API process, shared by every waiting request.

The tasks_notify_changed trigger announces a task reaching or leaving a final
state, and its progress. Each announcement wakes the requests watching that
task (long polls, event streams), and a task leaving a final state (a retry
from psql, say) loses its cached result, so no process serves the old state.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import defaultdict
from typing import Iterator, Protocol
from uuid import UUID


from asyncproc import db
from asyncproc.cache import ResultCache
from asyncproc.config import DatabaseSettings
from asyncproc.ledger import FINAL_STATUSES, STATUSES
from asyncproc.loops import LoopHealth

log = logging.getLogger(__name__)

CHANNEL = "asyncproc_task_changed"
_RECONNECT_SECONDS = 1.0


class Wakeable(Protocol):
    def set(self) -> None: ...


class TaskEvents:
    def __init__(self, settings: DatabaseSettings, cache: ResultCache):
        self._settings = settings
        self._cache = cache
        self._watchers: dict[UUID, set[Wakeable]] = defaultdict(set)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self.health = LoopHealth("task-change listener")
        self._thread = threading.Thread(target=self._listen_forever, name="task-events", daemon=True)

    def start(self) -> "TaskEvents":
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def state(self) -> str:
        """ok (listening), connecting, or failing (several failures in a row)."""
        if self.connected:
            return "ok"
        return self.health.state if self.health.failing else "connecting"

    @contextlib.contextmanager
    def watch(self, task_id: UUID, event: Wakeable | None = None) -> Iterator[Wakeable]:
        """`event` (a new threading.Event by default) is set whenever the task
        is announced; register before reading its state."""
        event = threading.Event() if event is None else event
        with self._lock:
            self._watchers[task_id].add(event)
        try:
            yield event
        finally:
            with self._lock:
                watchers = self._watchers[task_id]
                watchers.discard(event)
                if not watchers:
                    del self._watchers[task_id]

    def _announce(self, task_id: UUID, status: str, version: int) -> None:
        if status not in FINAL_STATUSES:
            self._cache.invalidate(task_id, version)
        with self._lock:
            watchers = list(self._watchers.get(task_id, ()))
        for event in watchers:
            event.set()

    def wake_everyone(self) -> None:
        with self._lock:
            watchers = [event for events in self._watchers.values() for event in events]
        for event in watchers:
            event.set()

    def _listen_forever(self) -> None:
        # Any role can NOTIFY on our channel, and any failure here would leave
        # waiters asleep and caches stale: nothing may end this loop but close().
        while not self._stop.is_set():
            try:
                self._listen()
            except Exception as exc:
                self.health.failed(exc)
                self._connected.clear()
                self.wake_everyone()
                self._stop.wait(self.health.backoff(_RECONNECT_SECONDS))
        self._connected.clear()

    def _listen(self) -> None:
        with db.connect(self._settings.url, self._settings, "asyncproc-api-listener") as conn:
            conn.execute(f"LISTEN {CHANNEL}")
            self._connected.set()
            self.health.succeeded()
            log.info("listening for task changes")
            # Anything announced while we were away is lost: look again.
            self.wake_everyone()
            while not self._stop.is_set():
                for notify in conn.notifies(timeout=1.0):
                    parsed = parse_notification(notify.payload)
                    if parsed is None:
                        log.warning("ignored a malformed %s notification: %r", CHANNEL, notify.payload[:200])
                        continue
                    self._announce(*parsed)


def parse_notification(payload: str) -> tuple[UUID, str, int] | None:
    """(task id, status, version) from "<uuid> <status> <version>" (asyncproc_tasks_notify_changed, migrations/current/10_tasks_status_machine.sql), or None for anything else."""
    parts = payload.split(" ")
    if len(parts) != 3 or parts[1] not in STATUSES or not parts[2].isdigit():
        return None
    try:
        return UUID(parts[0]), parts[1], int(parts[2])
    except ValueError:
        return None
