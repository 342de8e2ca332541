"""Rows that psql can store but Python's json cannot decode still read and cancel cleanly."""

from __future__ import annotations

import json

import pytest

from asyncproc.api import create_app
from asyncproc.config import CacheSettings, DatabaseSettings, Settings

BIG_NUMBER = "7" * 5000
DEEP = "[" * 3000 + "1" + "]" * 3000
POISON = {
    "a 5,000-digit number": '{"n": ' + BIG_NUMBER + "}",
    "3,000 levels of nesting": '{"deep": ' + DEEP + "}",
}


@pytest.fixture(scope="module")
def client(database_url, redis_url):
    app = create_app(Settings(db=DatabaseSettings(url=database_url), cache=CacheSettings(url=redis_url)))
    yield app.test_client()
    app.extensions["asyncproc"].close()


def insert(conn, payload: str) -> str:
    row = conn.execute(
        "INSERT INTO tasks (operation, payload) VALUES ('compute', %s::jsonb) RETURNING task_id", (payload,)
    ).fetchone()
    return str(row["task_id"])


@pytest.mark.parametrize("payload", POISON.values(), ids=POISON.keys())
def test_a_task_with_a_poison_payload_reads_and_cancels(client, conn, payload):
    task_id = insert(conn, payload)
    response = client.get(f"/results/{task_id}")
    assert response.status_code == 200
    assert response.get_json()["status"] == "pending"

    response = client.post(f"/results/{task_id}/cancel")
    assert response.status_code == 200
    assert response.get_json()["status"] == "cancelled"
    assert client.get(f"/results/{task_id}").get_json()["status"] == "cancelled"


@pytest.mark.parametrize("result", POISON.values(), ids=POISON.keys())
def test_a_poison_result_is_served_exactly_as_stored(client, conn, worker_conn, result):
    task_id = insert(conn, "{}")
    worker_conn.execute("UPDATE tasks SET status = 'running', attempts = 1 WHERE task_id = %s", (task_id,))
    worker_conn.execute(
        "UPDATE tasks SET status = 'completed', result = %s::jsonb WHERE task_id = %s", (result, task_id)
    )
    stored = conn.execute("SELECT result::text AS text FROM tasks WHERE task_id = %s", (task_id,)).fetchone()["text"]
    for _ in range(2):  # from PostgreSQL, then from the Redis cache
        response = client.get(f"/results/{task_id}")
        assert response.status_code == 200
        body = response.get_data(as_text=True)
        assert f'"result":{stored},' in body
        assert body.startswith('{"task_id":"') and json.loads(body.replace(stored, "null"))["status"] == "completed"
