"""What one Flask app of asyncproc holds open: settings, pools, cache, listeners.

Its own module, importing neither asyncproc.api nor asyncproc.dashboard, so that
both take it from here: the API builds it, and each blueprint reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg_pool
from flask import current_app

from asyncproc.cache import ResultCache
from asyncproc.config import ApiSettings, CallbackSettings, WorkerSettings
from asyncproc.group_commit import GroupCommit
from asyncproc.task_events import TaskEvents
from asyncproc.waiting import Waiters


@dataclass
class Resources:
    api: ApiSettings
    # The API checks a task's callback URL when it is submitted.
    callbacks: CallbackSettings
    # The dashboard shows the workers' defaults and when a worker counts as alive.
    worker: WorkerSettings
    pool: psycopg_pool.ConnectionPool
    commits: psycopg_pool.ConnectionPool
    inserts: GroupCommit
    cache: ResultCache
    events: TaskEvents
    waiters: Waiters

    def close(self) -> None:
        self.waiters.close()
        self.events.close()
        self.commits.close()
        self.pool.close()


def resources() -> Resources:
    return current_app.extensions["asyncproc"]
