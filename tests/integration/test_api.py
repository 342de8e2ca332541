"""The HTTP contract, in process, against the real PostgreSQL and Redis."""

from __future__ import annotations

import json
import uuid

import pytest
import redis

from asyncproc.api import create_app
from asyncproc.cache import KEY_PREFIX
from asyncproc.config import Settings

from tests.conftest import free_port

UNREACHABLE_DB = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"


@pytest.fixture(scope="module")
def app(database_url, redis_url):
    application = create_app(Settings(database_url=database_url, redis_url=redis_url, max_body_bytes=4096))
    yield application
    application.extensions["asyncproc"].close()


@pytest.fixture
def client(app):
    return app.test_client()


def post(client, body, headers=None):
    return client.post("/process", data=json.dumps(body), content_type="application/json", headers=headers or {})


def count_tasks(conn) -> int:
    return conn.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"]


def test_post_process_answers_like_the_seed(client, clean_db):
    response = post(client, {"data": {"input": 42, "operation": "compute"}})
    assert response.status_code == 202
    body = response.get_json()
    assert set(body) == {"task_id", "status", "message"}
    assert body["status"] == "pending"
    assert body["message"] == "Task queued for processing"
    assert response.headers["Location"] == f"/results/{body['task_id']}"
    row = clean_db.execute("SELECT operation, payload, status, max_attempts FROM tasks").fetchone()
    assert row == {"operation": "compute", "payload": {"input": 42}, "status": "pending", "max_attempts": 3}


def test_optional_fields_are_stored(client, clean_db):
    response = post(
        client,
        {"operation": "sleep", "data": {"seconds": 0}, "priority": 5, "delay_seconds": 60, "max_attempts": 7},
        headers={"X-Request-ID": "trace-123"},
    )
    assert response.status_code == 202
    assert response.headers["X-Request-ID"] == "trace-123"
    row = clean_db.execute(
        "SELECT operation, priority, max_attempts, request_id, scheduled_at - created_at > interval '59 seconds' AS later FROM tasks"
    ).fetchone()
    assert row == {"operation": "sleep", "priority": 5, "max_attempts": 7, "request_id": "trace-123", "later": True}


def test_get_returns_every_seed_field(client, clean_db):
    task_id = post(client, {"data": {"n": 3}}).get_json()["task_id"]
    response = client.get(f"/results/{task_id}")
    assert response.status_code == 200
    body = response.get_json()
    assert {"task_id", "status", "result", "error_message", "created_at", "completed_at"} <= set(body)
    assert {"operation", "attempts", "started_at", "progress"} <= set(body)
    assert body["task_id"] == task_id and body["status"] == "pending" and body["operation"] == "compute"


# (description, body bytes, content type, expected status)
BAD_REQUESTS = [
    ("not JSON", b"{not json", "application/json", 400),
    ("empty body", b"", "application/json", 400),
    ("wrong content type", b'{"data": {}}', "text/plain", 415),
    ("form content type", b"data=1", "application/x-www-form-urlencoded", 415),
    ("body is a list", b"[1, 2]", "application/json", 422),
    ("data is a string", b'{"data": "x"}', "application/json", 422),
    ("unknown field", b'{"data": {}, "priorty": 1}', "application/json", 422),
    ("priority is a string", b'{"priority": "high"}', "application/json", 422),
    ("priority is a bool", b'{"priority": true}', "application/json", 422),
    ("max_attempts zero", b'{"max_attempts": 0}', "application/json", 422),
    ("delay_seconds negative", b'{"delay_seconds": -1}', "application/json", 422),
    ("run_at not a date", b'{"run_at": "tomorrow"}', "application/json", 422),
    ("run_at and delay", b'{"run_at": "2030-01-01T00:00:00Z", "delay_seconds": 1}', "application/json", 422),
    ("operation with spaces", b'{"operation": "drop table"}', "application/json", 422),
    ("operation twice", b'{"operation": "a", "data": {"operation": "b"}}', "application/json", 422),
    ("NaN", b'{"data": {"n": NaN}}', "application/json", 400),
    ("NUL in a string", b'{"data": {"s": "a\\u0000b"}}', "application/json", 422),
    ("lone surrogate", b'{"data": {"s": "\\ud800"}}', "application/json", 422),
    ("deep nesting", b'{"data": ' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b"}", "application/json", 422),
    ("over the body limit", b'{"data": {"s": "' + b"x" * 5000 + b'"}}', "application/json", 413),
]


@pytest.mark.parametrize("body,content_type,status", [case[1:] for case in BAD_REQUESTS], ids=[case[0] for case in BAD_REQUESTS])
def test_bad_input_gets_a_json_4xx_and_writes_nothing(client, clean_db, body, content_type, status):
    response = client.post("/process", data=body, content_type=content_type)
    assert response.status_code == status
    error = response.get_json()["error"]
    assert isinstance(error["code"], str) and isinstance(error["message"], str)
    assert count_tasks(clean_db) == 0


@pytest.mark.parametrize("path", ["/results/" + str(uuid.uuid4()), "/results/not-a-uuid", "/results/1;DROP TABLE tasks"])
def test_unknown_or_malformed_ids_are_404_json(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "task_not_found"


def test_wrong_method_and_unknown_path_are_json(client):
    wrong = client.get("/process")
    assert wrong.status_code == 405
    assert wrong.get_json()["error"]["code"] == "method_not_allowed"
    missing = client.get("/nowhere")
    assert missing.status_code == 404
    assert missing.get_json()["error"]["code"] == "not_found"


def test_idempotency_key_returns_the_original_task(client, clean_db):
    headers = {"Idempotency-Key": "order-42"}
    first = post(client, {"data": {"n": 5}}, headers)
    second = post(client, {"data": {"n": 5}}, headers)
    assert first.status_code == 202
    assert second.status_code == 200
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.get_json()["task_id"] == first.get_json()["task_id"]
    assert count_tasks(clean_db) == 1
    different = post(client, {"data": {"n": 6}}, headers)
    assert different.status_code == 409
    assert different.get_json()["error"]["details"] == {"task_id": first.get_json()["task_id"]}
    assert count_tasks(clean_db) == 1


def test_health_reports_database_and_cache(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "database": "ok", "cache": "ok"}


def test_finished_results_are_cached_and_a_hit_never_touches_postgres(client, clean_db, worker_conn, redis_url):
    task_id = post(client, {"data": {"n": 10}}).get_json()["task_id"]
    worker_conn.execute("UPDATE tasks SET status = 'running', attempts = 1 WHERE task_id = %s", (task_id,))
    worker_conn.execute("UPDATE tasks SET status = 'completed', result = '45' WHERE task_id = %s", (task_id,))
    first = client.get(f"/results/{task_id}").get_json()
    assert first["status"] == "completed" and first["result"] == 45
    ttl = redis.Redis.from_url(redis_url).ttl(KEY_PREFIX + task_id)
    assert 0 < ttl <= Settings().result_ttl_seconds

    # The same cache in front of a database that cannot be reached.
    blind = create_app(Settings(database_url=UNREACHABLE_DB, redis_url=redis_url, db_connect_timeout=1))
    try:
        hit = blind.test_client().get(f"/results/{task_id}")
        assert hit.status_code == 200
        assert hit.get_json() == first
        miss = blind.test_client().get(f"/results/{uuid.uuid4()}")
        assert miss.status_code == 503
        assert miss.get_json()["error"]["code"] == "database_unavailable"
    finally:
        blind.extensions["asyncproc"].close()


def test_pending_results_are_not_cached(client, clean_db, redis_url):
    task_id = post(client, {"data": {"n": 10}}).get_json()["task_id"]
    assert client.get(f"/results/{task_id}").get_json()["status"] == "pending"
    assert redis.Redis.from_url(redis_url).exists(KEY_PREFIX + task_id) == 0


def test_without_a_database_the_api_answers_503_json():
    blind = create_app(Settings(database_url=UNREACHABLE_DB, db_connect_timeout=1))
    try:
        client = blind.test_client()
        accepted = post(client, {"data": {}})
        assert accepted.status_code == 503
        assert accepted.get_json()["error"]["code"] == "database_unavailable"
        health = client.get("/health")
        assert health.status_code == 503
        assert health.get_json()["database"] == "down"
    finally:
        blind.extensions["asyncproc"].close()


def test_with_redis_down_everything_still_works(database_url, clean_db, worker_conn):
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    app = create_app(Settings(database_url=database_url, redis_url=dead_redis))
    try:
        client = app.test_client()
        task_id = post(client, {"data": {"n": 4}}).get_json()["task_id"]
        worker_conn.execute("UPDATE tasks SET status = 'running', attempts = 1 WHERE task_id = %s", (task_id,))
        worker_conn.execute("UPDATE tasks SET status = 'completed', result = '6' WHERE task_id = %s", (task_id,))
        assert client.get(f"/results/{task_id}").get_json()["result"] == 6
        health = client.get("/health")
        assert health.status_code == 200
        assert health.get_json()["cache"] == "down"
    finally:
        app.extensions["asyncproc"].close()
