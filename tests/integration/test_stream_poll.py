"""The one poller per process that reads every watched task in one query: an
event stream sees the unannounced claim, and a long poll is answered while the
listener is away."""

from __future__ import annotations

import json
import threading
import time

from asyncproc.api import create_app
from asyncproc.cache import ResultCache
from asyncproc.config import DatabaseSettings, Settings
from asyncproc.db import open_pool
from asyncproc.task_events import TaskEvents
from asyncproc.waiting import Parked, Waiters, run_blocking

from tests.conftest import wait_for


def _events(chunks):
    for chunk in chunks:
        if chunk.startswith(b"id: "):
            yield json.loads(chunk.split(b"data: ", 1)[1])


def test_a_stream_sees_the_unannounced_claim_within_about_a_second(database_url, clean_db, worker_conn):
    app = create_app(Settings(db=DatabaseSettings(url=database_url)))
    res = app.extensions["asyncproc"]
    try:
        wait_for(lambda: res.events.connected, 10, "the listener")
        task_id = clean_db.execute("INSERT INTO tasks (operation) VALUES ('compute') RETURNING task_id").fetchone()["task_id"]
        response = app.test_client().get(f"/results/{task_id}/events")
        events = _events(response.response)
        assert next(events)["status"] == "pending"
        claimed = time.monotonic()
        worker_conn.execute("UPDATE tasks SET status = 'running', attempts = 1 WHERE task_id = %s", (task_id,))
        assert next(events)["status"] == "running"
        assert time.monotonic() - claimed < 3
        response.close()
    finally:
        res.close()


def test_without_the_listener_a_long_poll_is_answered_by_the_poller(database_url, clean_db, worker_conn):
    settings = DatabaseSettings(url=database_url)
    cache = ResultCache(None, 60)
    # A listener never started: as if it had lost the database for good.
    events = TaskEvents(settings, cache)
    pool = open_pool(settings, "asyncproc-test", 2)
    pool.open()
    waiters = Waiters(pool, cache, events, 10, 10, 60)
    try:
        task_id = clean_db.execute("INSERT INTO tasks (operation) VALUES ('compute') RETURNING task_id").fetchone()["task_id"]
        worker_conn.execute("UPDATE tasks SET status = 'running', attempts = 1 WHERE task_id = %s", (task_id,))
        started = time.monotonic()

        def finish_once_parked():
            wait_for(lambda: task_id in waiters._polls, 10, "the long poll to be parked")
            worker_conn.execute("UPDATE tasks SET status = 'completed', result = '1' WHERE task_id = %s", (task_id,))

        finisher = threading.Thread(target=finish_once_parked)
        finisher.start()
        [document] = run_blocking(Parked(waiters.wait_for_result(task_id, 30, None), waiters.admit("test")))
        assert json.loads(document)["status"] == "completed"
        assert time.monotonic() - started < 5
        assert waiters.count == 0
        finisher.join(10)
    finally:
        waiters.close()
        pool.close()
