"""The HTTP contract, in process, against the real PostgreSQL and Redis."""

from __future__ import annotations

import json
import logging
import uuid

import pytest
import redis

from asyncproc import ledger
from asyncproc.api import create_app
from asyncproc.cache import KEY_PREFIX
from asyncproc.config import ApiSettings, CacheSettings, DatabaseSettings, Settings
from tests.conftest import free_port
from tests.support import BAD_REQUESTS, UNREACHABLE_DB, body, count_tasks, post


@pytest.fixture(scope="module")
def app(database_url, redis_url):
    application = create_app(Settings(db=DatabaseSettings(url=database_url), cache=CacheSettings(url=redis_url), api=ApiSettings(max_body_bytes=8192)))
    yield application
    application.extensions["asyncproc"].close()


@pytest.fixture
def client(app):
    return app.test_client()


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


@pytest.mark.parametrize("bad", BAD_REQUESTS, ids=[bad.name for bad in BAD_REQUESTS])
def test_bad_input_gets_a_json_4xx_writes_nothing_and_logs_a_warning(client, clean_db, caplog, bad):
    caplog.set_level(logging.INFO)
    response = client.open(
        bad.path, method=bad.method, data=bad.body, content_type=bad.content_type, headers=bad.headers
    )
    assert response.status_code == bad.status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    document = response.get_json()
    assert set(document) == {"error", "detail"}
    error = document["error"]
    assert set(error) <= {"code", "message", "details"}
    assert error["code"] == bad.code
    assert isinstance(error["message"], str) and error["message"]
    assert document["detail"] == error["message"]
    if bad.status == 405:
        assert response.headers["Allow"]
    assert count_tasks(clean_db) == 0
    assert any(record.levelno == logging.WARNING for record in caplog.records), caplog.text
    assert all(record.levelno < logging.ERROR and record.exc_info is None for record in caplog.records), caplog.text
    assert "Traceback" not in caplog.text


INJECTION = "'); DROP TABLE tasks; --"
# The same attack without spaces, which header values may not contain.
INJECTION_TOKEN = "x');DROP/**/TABLE/**/tasks;--"

# Every string field carrying SQL: stored verbatim, or rejected. compute's
# `input` takes any JSON value.
INJECTIONS = [
    ("data value", {"data": {"input": INJECTION}}, {}, 202),
    ("data key", {"data": {"input": {INJECTION: 1}}}, {}, 202),
    ("nested data value", {"data": {"input": [{"b": INJECTION}]}}, {}, 202),
    ("input field", {"data": {INJECTION: 1}}, {}, 422),
    ("operation", {"operation": INJECTION}, {}, 422),
    ("operation in data", {"data": {"operation": INJECTION}}, {}, 422),
    ("run_at", {"run_at": INJECTION}, {}, 422),
    ("Idempotency-Key", {"data": {}}, {"Idempotency-Key": INJECTION_TOKEN}, 202),
    ("X-Request-ID", {"data": {}}, {"X-Request-ID": INJECTION_TOKEN}, 202),
]


@pytest.mark.parametrize("sent,headers,status", [case[1:] for case in INJECTIONS], ids=[case[0] for case in INJECTIONS])
def test_sql_in_a_string_field_is_stored_verbatim_or_rejected_never_run(client, clean_db, sent, headers, status):
    response = post(client, sent, headers)
    assert response.status_code == status
    assert clean_db.execute("SELECT to_regclass('public.tasks') IS NOT NULL AS exists").fetchone()["exists"]
    rows = clean_db.execute("SELECT task_id, payload, idempotency_key, request_id FROM tasks").fetchall()
    if status != 202:
        assert rows == []
        return
    assert rows == [
        {
            "task_id": uuid.UUID(response.get_json()["task_id"]),
            "payload": sent["data"],
            "idempotency_key": headers.get("Idempotency-Key"),
            "request_id": headers.get("X-Request-ID", rows[0]["request_id"]),
        }
    ]
    assert client.get(f"/results/{rows[0]['task_id']}").get_json()["task_id"] == response.get_json()["task_id"]


def test_the_default_body_limit_is_one_mib(database_url, clean_db):
    app = create_app(Settings(db=DatabaseSettings(url=database_url)))
    try:
        client = app.test_client()
        envelope = len(body({"data": {"input": ""}}))
        over = client.post("/process", data=body({"data": {"input": "x" * ((1 << 20) - envelope + 1)}}), content_type="application/json")
        assert over.status_code == 413
        assert over.get_json()["error"]["code"] == "body_too_large"
        assert count_tasks(clean_db) == 0
        at_limit = client.post("/process", data=body({"data": {"input": "x" * ((1 << 20) - envelope)}}), content_type="application/json")
        assert at_limit.status_code == 202
    finally:
        app.extensions["asyncproc"].close()


def test_unicode_and_big_numbers_are_stored_exactly_as_sent(client, clean_db):
    data = {"input": {"text": "naïve café 中文 🚀 \u202e", "key 🔑": [12345.678, -(10**40), 10**40, 0.1, 1e-300]}}
    response = post(client, {"data": data})
    assert response.status_code == 202
    assert clean_db.execute("SELECT payload FROM tasks").fetchone()["payload"] == data


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
    assert response.get_json() == {"status": "ok", "database": "ok", "cache": "ok", "listener": "ok"}


def test_finished_results_are_cached_and_a_hit_never_touches_postgres(client, clean_db, worker_conn, redis_url):
    task_id = post(client, {"data": {"n": 10}}).get_json()["task_id"]
    worker_conn.execute("UPDATE tasks SET status = 'running', attempts = 1 WHERE task_id = %s", (task_id,))
    worker_conn.execute("UPDATE tasks SET status = 'completed', result = '45' WHERE task_id = %s", (task_id,))
    first = client.get(f"/results/{task_id}").get_json()
    assert first["status"] == "completed" and first["result"] == 45
    ttl = redis.Redis.from_url(redis_url).ttl(KEY_PREFIX + task_id)
    assert 0 < ttl <= CacheSettings().result_ttl_seconds

    # The same cache in front of a database that cannot be reached.
    blind = create_app(Settings(db=DatabaseSettings(url=UNREACHABLE_DB, connect_timeout=1), cache=CacheSettings(url=redis_url)))
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
    blind = create_app(Settings(db=DatabaseSettings(url=UNREACHABLE_DB, connect_timeout=1)))
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
    app = create_app(Settings(db=DatabaseSettings(url=database_url), cache=CacheSettings(url=dead_redis)))
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


def _ids_issued_in(conn, make_ids) -> list[uuid.UUID]:
    """The ids `make_ids` returns, checked against the database clock around it (ms)."""
    before = conn.execute("SELECT floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint AS ms").fetchone()["ms"]
    ids = [uuid.UUID(str(task_id)) for task_id in make_ids()]
    after = conn.execute("SELECT ceil(extract(epoch FROM clock_timestamp()) * 1000)::bigint AS ms").fetchone()["ms"]
    for task_id in ids:
        assert task_id.version == 7 and task_id.variant == uuid.RFC_4122, task_id
        # Python's clock and PostgreSQL's are one host's here; 50 ms covers rounding.
        assert before - 50 <= task_id.int >> 80 <= after + 50, task_id
    return ids


def test_task_ids_are_time_ordered_with_74_random_bits_on_every_path(client, clean_db, database_url):
    """Task ids are UUIDv7 (RFC 9562): a millisecond timestamp, then 74 random
    bits. New tasks then sit at the end of every index on their id, where a
    random id wrote all over a million-row index (figure 9); the random bits
    keep an id as hard to guess as a session token, and no two ids a step apart.
    """
    new = ledger.NewTask(operation="compute", payload={"n": 1}, max_attempts=3)
    paths = {
        "POST /process": lambda: [post(client, {"data": {"n": 1}}).get_json()["task_id"] for _ in range(20)],
        "POST /process/batch": lambda: [
            item["task_id"] for item in client.post(
                "/process/batch", data=json.dumps({"tasks": [{"data": {"n": i}} for i in range(20)]}),
                content_type="application/json").get_json()["tasks"]
        ],
        "the group commit": lambda: [t.task_id for t in ledger.tasks_insert_many(clean_db, [new] * 20)],
        "psql": lambda: [
            clean_db.execute("INSERT INTO tasks (operation) VALUES ('compute') RETURNING task_id").fetchone()["task_id"]
            for _ in range(20)
        ],
    }
    for path, make_ids in paths.items():
        ids = _ids_issued_in(clean_db, make_ids)
        assert len(set(ids)) == len(ids), path
        stamps = [task_id.int >> 80 for task_id in ids]
        assert stamps == sorted(stamps), path
        random_parts = [task_id.int & ((1 << 80) - 1) & ~(0xF << 76) & ~(0x3 << 62) for task_id in ids]
        assert len(set(random_parts)) == len(ids), path
        steps = {b.int - a.int for a, b in zip(ids, ids[1:])}
        assert len(steps) == len(ids) - 1, path
    assert len(clean_db.execute("SELECT task_id FROM tasks").fetchall()) == 80
