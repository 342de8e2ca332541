"""POST /process/batch, in process, against the real PostgreSQL."""

from __future__ import annotations

import json

import pytest

from asyncproc.api import create_app
from asyncproc.contract import MAX_BATCH_TASKS
from asyncproc.config import DatabaseSettings, Settings


@pytest.fixture(scope="module")
def app(database_url):
    application = create_app(Settings(db=DatabaseSettings(url=database_url)))
    yield application
    application.extensions["asyncproc"].pool.close()


@pytest.fixture
def client(app):
    return app.test_client()


def post_batch(client, body, headers=None):
    return client.post("/process/batch", data=json.dumps(body), content_type="application/json", headers=headers or {})


def count(conn, table: str) -> int:
    return conn.execute(f"SELECT count(*) AS n FROM {table}").fetchone()["n"]


def test_a_batch_is_stored_and_queued_in_request_order(client, clean_db):
    items = [
        {"data": {"n": 1}},
        {"operation": "sleep", "data": {"seconds": 0}, "priority": 4, "max_attempts": 5},
        {"data": {"operation": "fail", "times": 1}, "delay_seconds": 60},
    ]
    response = post_batch(client, {"tasks": items}, headers={"X-Request-ID": "batch-1"})
    assert response.status_code == 202, response.get_data(as_text=True)
    answer = response.get_json()["tasks"]
    assert [set(item) for item in answer] == [{"task_id", "status", "location"}] * 3
    assert all(item["status"] == "pending" and item["location"] == f"/results/{item['task_id']}" for item in answer)
    rows = {
        str(row["task_id"]): row
        for row in clean_db.execute(
            "SELECT task_id, operation, payload, priority, max_attempts, request_id,"
            " scheduled_at > now() + interval '50 seconds' AS later FROM tasks"
        )
    }
    stored = [rows[item["task_id"]] for item in answer]
    assert [(r["operation"], r["payload"], r["priority"], r["max_attempts"], r["later"]) for r in stored] == [
        ("compute", {"n": 1}, 0, 3, False),
        ("sleep", {"seconds": 0}, 4, 5, False),
        ("fail", {"times": 1}, 0, 3, True),
    ]
    assert {r["request_id"] for r in stored} == {"batch-1"}
    jobs = clean_db.execute("SELECT queueing_lock FROM procrastinate_jobs WHERE status = 'todo'").fetchall()
    assert sorted(job["queueing_lock"] for job in jobs) == sorted(item["task_id"] for item in answer)


def test_a_full_batch_is_one_transaction(client, clean_db):
    response = post_batch(client, {"tasks": [{"data": {"n": i}} for i in range(MAX_BATCH_TASKS)]})
    assert response.status_code == 202
    assert len(response.get_json()["tasks"]) == MAX_BATCH_TASKS
    assert count(clean_db, "tasks") == MAX_BATCH_TASKS
    assert count(clean_db, "procrastinate_jobs") == MAX_BATCH_TASKS
    transactions = clean_db.execute("SELECT count(DISTINCT xmin::text) AS n FROM tasks").fetchone()["n"]
    assert transactions == 1


def test_an_invalid_item_rejects_the_whole_batch_and_names_its_index(client, clean_db):
    response = post_batch(client, {"tasks": [{"data": {}}, {"data": {}}, {"priority": "high"}]})
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error["code"] == "invalid_request"
    assert error["message"].startswith("tasks[2]: priority must be an integer")
    assert error["details"] == {"index": 2, "problems": [{"field": "priority"}]}
    assert count(clean_db, "tasks") == 0


def test_too_many_tasks_is_413_json_and_writes_nothing(client, clean_db):
    response = post_batch(client, {"tasks": [{}] * (MAX_BATCH_TASKS + 1)})
    assert response.status_code == 413
    error = response.get_json()["error"]
    assert error["code"] == "batch_too_large"
    assert error["details"] == {"max_tasks": MAX_BATCH_TASKS, "tasks": MAX_BATCH_TASKS + 1}
    assert count(clean_db, "tasks") == 0


@pytest.mark.parametrize(
    "body",
    [[{}], {}, {"tasks": []}, {"tasks": {}}, {"tasks": [{}], "priority": 1}, {"tasks": [1]}],
    ids=["a bare list", "no tasks", "empty tasks", "tasks not a list", "extra field", "item not an object"],
)
def test_malformed_batches_are_422_json(client, clean_db, body):
    response = post_batch(client, body)
    assert response.status_code == 422
    assert response.get_json()["error"]["code"] == "invalid_request"
    assert count(clean_db, "tasks") == 0


def test_idempotency_key_on_a_batch_is_rejected(client, clean_db):
    response = post_batch(client, {"tasks": [{}]}, headers={"Idempotency-Key": "k-1"})
    assert response.status_code == 422
    assert response.get_json()["error"]["details"] == [{"field": "Idempotency-Key"}]
    assert count(clean_db, "tasks") == 0


def test_wrong_content_type_is_415(client, clean_db):
    response = client.post("/process/batch", data='{"tasks": [{}]}', content_type="text/plain")
    assert response.status_code == 415
    assert count(clean_db, "tasks") == 0
