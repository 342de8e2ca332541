"""A task's own time limit: POST /process, POST /process/batch and the tasks column."""

from __future__ import annotations

import json

import psycopg
import pytest

from asyncproc.api import create_app
from asyncproc.config import DatabaseSettings, Settings


@pytest.fixture(scope="module")
def client(database_url):
    app = create_app(Settings(db=DatabaseSettings(url=database_url)))
    yield app.test_client()
    app.extensions["asyncproc"].close()


def post(client, path: str, body: dict):
    return client.post(path, data=json.dumps(body), content_type="application/json")


def stored_limit(conn, task_id: str):
    return conn.execute("SELECT timeout_seconds FROM tasks WHERE task_id = %s", (task_id,)).fetchone()["timeout_seconds"]


def test_a_task_carries_the_time_limit_it_was_sent_with(client, conn):
    one = post(client, "/process", {"operation": "sleep", "timeout_seconds": 2.5}).get_json()["task_id"]
    plain = post(client, "/process", {"operation": "sleep"}).get_json()["task_id"]
    batch = post(client, "/process/batch", {"tasks": [{"operation": "sleep", "timeout_seconds": 30}, {}]}).get_json()
    assert [stored_limit(conn, task_id) for task_id in (one, plain)] == [2.5, None]
    assert [stored_limit(conn, item["task_id"]) for item in batch["tasks"]] == [30, None]


@pytest.mark.parametrize("value", [0, -1, 604801, "10", True])
def test_a_time_limit_out_of_range_is_a_422_naming_the_field(client, value):
    for path, body in [("/process", {"timeout_seconds": value}), ("/process/batch", {"tasks": [{"timeout_seconds": value}]})]:
        response = post(client, path, body)
        assert response.status_code == 422, (path, value)
        assert "timeout_seconds" in response.get_json()["error"]["message"]


def test_the_column_refuses_a_limit_out_of_range(conn):
    with pytest.raises(psycopg.errors.CheckViolation, match="tasks_timeout_seconds_check"):
        conn.execute("INSERT INTO tasks (operation, timeout_seconds) VALUES ('sleep', 0)")
