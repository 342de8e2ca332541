"""An event stream sees the claim of its task, which is not announced, through
the one poller per process that reads every streamed task in one query."""

from __future__ import annotations

import json
import time

from asyncproc.api import create_app
from asyncproc.config import Settings

from tests.conftest import wait_for


def _events(chunks):
    for chunk in chunks:
        if chunk.startswith(b"id: "):
            yield json.loads(chunk.split(b"data: ", 1)[1])


def test_a_stream_sees_the_unannounced_claim_within_about_a_second(database_url, clean_db, worker_conn):
    app = create_app(Settings(database_url=database_url))
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
