"""The HTTP contract, in process, against the real PostgreSQL and Redis."""

from __future__ import annotations

import json
import logging
import uuid
from typing import NamedTuple

import pytest
import redis

from asyncproc import ledger
from asyncproc.api import create_app
from asyncproc.cache import KEY_PREFIX
from asyncproc.config import ApiSettings, CacheSettings, DatabaseSettings, Settings

from tests.conftest import free_port

UNREACHABLE_DB = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"


@pytest.fixture(scope="module")
def app(database_url, redis_url):
    application = create_app(Settings(db=DatabaseSettings(url=database_url), cache=CacheSettings(url=redis_url), api=ApiSettings(max_body_bytes=8192)))
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


class Bad(NamedTuple):
    """One bad request: what is sent, and the status and error code it must get."""

    name: str
    status: int
    code: str
    body: bytes = b""
    content_type: str | None = "application/json"
    method: str = "POST"
    path: str = "/process"
    headers: dict[str, str] = {}


def body(value: object) -> bytes:
    return json.dumps(value).encode()


def nested(depth: int) -> bytes:
    return b'{"data": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}"


MALFORMED, INVALID, UNSUPPORTED = "malformed_body", "invalid_request", "unsupported_media_type"
NOT_FOUND, TASK_NOT_FOUND, NOT_ALLOWED = "not_found", "task_not_found", "method_not_allowed"

# Every class of bad input, with the answer it must get. The test below also
# checks the error shape, that no row was written, and that the log has a
# warning and no traceback.
BAD_REQUESTS = [
    # The body is not JSON, or not JSON at all.
    Bad("not JSON", 400, MALFORMED, b"{not json"),
    Bad("truncated JSON", 400, MALFORMED, b'{"data": {'),
    Bad("empty body", 400, MALFORMED, b""),
    Bad("whitespace body", 400, MALFORMED, b"  \n "),
    Bad("invalid UTF-8", 400, MALFORMED, b'{"data": {"s": "\xff"}}'),
    Bad("NaN", 400, MALFORMED, b'{"data": {"n": NaN}}'),
    Bad("Infinity", 400, MALFORMED, b'{"priority": Infinity}'),
    # Wrong content type.
    Bad("text/plain", 415, UNSUPPORTED, b'{"data": {}}', "text/plain"),
    Bad("form content type", 415, UNSUPPORTED, b"data=1", "application/x-www-form-urlencoded"),
    Bad("no content type", 415, UNSUPPORTED, b'{"data": {}}', None),
    # Wrong types in every field.
    Bad("body is a list", 422, INVALID, b"[1, 2]"),
    Bad("body is a string", 422, INVALID, b'"data"'),
    Bad("body is null", 422, INVALID, b"null"),
    Bad("unknown field", 422, INVALID, body({"data": {}, "priorty": 1})),
    Bad("data is a string", 422, INVALID, body({"data": "x"})),
    Bad("data is a list", 422, INVALID, body({"data": [1]})),
    Bad("data is a number", 422, INVALID, body({"data": 1})),
    Bad("operation is a number", 422, INVALID, body({"operation": 1})),
    Bad("operation is a list", 422, INVALID, body({"operation": ["compute"]})),
    Bad("operation in data is a bool", 422, INVALID, body({"data": {"operation": True}})),
    Bad("priority is a string", 422, INVALID, body({"priority": "high"})),
    Bad("priority is a bool", 422, INVALID, body({"priority": True})),
    Bad("priority is a float", 422, INVALID, body({"priority": 1.5})),
    Bad("priority is null", 422, INVALID, body({"priority": None})),
    Bad("max_attempts is a string", 422, INVALID, body({"max_attempts": "3"})),
    Bad("max_attempts zero", 422, INVALID, body({"max_attempts": 0})),
    Bad("max_attempts 101", 422, INVALID, body({"max_attempts": 101})),
    Bad("delay_seconds is a string", 422, INVALID, body({"delay_seconds": "5"})),
    Bad("delay_seconds negative", 422, INVALID, body({"delay_seconds": -1})),
    Bad("run_at is a number", 422, INVALID, body({"run_at": 1700000000})),
    Bad("run_at not a date", 422, INVALID, body({"run_at": "tomorrow"})),
    Bad("run_at and delay", 422, INVALID, body({"run_at": "2030-01-01T00:00:00Z", "delay_seconds": 1})),
    # Unknown operations, and input that fails the operation's schema.
    Bad("unknown operation", 422, INVALID, body({"operation": "no_such_thing"})),
    Bad("unknown operation in data", 422, INVALID, body({"data": {"operation": "no_such_thing"}})),
    Bad("operation with spaces", 422, INVALID, body({"operation": "drop table"})),
    Bad("operation twice", 422, INVALID, body({"operation": "compute", "data": {"operation": "sleep"}})),
    Bad("compute n is a string", 422, INVALID, body({"data": {"n": "10"}})),
    Bad("compute n negative", 422, INVALID, body({"data": {"n": -1}})),
    Bad("sleep seconds too long", 422, INVALID, body({"operation": "sleep", "data": {"seconds": 86401}})),
    Bad("fail times is a string", 422, INVALID, body({"operation": "fail", "data": {"times": "2"}})),
    # Size, depth, unicode, NUL bytes, huge numbers.
    Bad("over the body limit", 413, "body_too_large", body({"data": {"s": "x" * 9000}})),
    Bad("nested 40 deep", 422, INVALID, nested(40)),
    Bad("nested 2000 deep", 400, MALFORMED, nested(2000)[:4000]),
    Bad("NUL in a string", 422, INVALID, b'{"data": {"s": "a\\u0000b"}}'),
    Bad("NUL in a key", 422, INVALID, b'{"data": {"a\\u0000": 1}}'),
    Bad("lone surrogate", 422, INVALID, b'{"data": {"s": "\\ud800"}}'),
    Bad("unicode operation name", 422, INVALID, body({"operation": "c\u00f6mpute"})),
    Bad("number overflows to infinity", 422, INVALID, b'{"data": {"x": 1e400}}'),
    Bad("5000-digit integer", 400, MALFORMED, b'{"data": {"x": ' + b"9" * 5000 + b"}}"),
    Bad("huge priority", 422, INVALID, body({"priority": 10**30})),
    Bad("huge compute n", 422, INVALID, body({"data": {"n": 10**30}})),
    # Headers.
    Bad("Idempotency-Key with spaces", 422, INVALID, body({}), headers={"Idempotency-Key": "a b"}),
    Bad("Idempotency-Key too long", 422, INVALID, body({}), headers={"Idempotency-Key": "k" * 256}),
    # Malformed and unknown task ids.
    Bad("unknown task id", 404, TASK_NOT_FOUND, method="GET", path=f"/results/{uuid.uuid4()}"),
    Bad("task id not a uuid", 404, TASK_NOT_FOUND, method="GET", path="/results/not-a-uuid"),
    Bad("task id a number", 404, TASK_NOT_FOUND, method="GET", path="/results/12345"),
    Bad("task id with SQL", 404, TASK_NOT_FOUND, method="GET", path="/results/1;DROP TABLE tasks"),
    Bad("task id 5000 chars", 404, TASK_NOT_FOUND, method="GET", path="/results/" + "a" * 5000),
    Bad("task id with an unknown suffix", 404, NOT_FOUND, method="GET", path=f"/results/{uuid.uuid4()}/x"),
    # Wrong methods.
    Bad("GET /process", 405, NOT_ALLOWED, method="GET"),
    Bad("PUT /process", 405, NOT_ALLOWED, body({}), method="PUT"),
    Bad("DELETE /process", 405, NOT_ALLOWED, method="DELETE"),
    Bad("POST /results/id", 405, NOT_ALLOWED, body({}), path=f"/results/{uuid.uuid4()}"),
    Bad("PATCH /results/id", 405, NOT_ALLOWED, body({}), method="PATCH", path=f"/results/{uuid.uuid4()}"),
    Bad("POST /health", 405, NOT_ALLOWED, path="/health"),
    Bad("DELETE /openapi.json", 405, NOT_ALLOWED, method="DELETE", path="/openapi.json"),
    # Unknown paths.
    Bad("GET /nowhere", 404, NOT_FOUND, method="GET", path="/nowhere"),
    Bad("POST /process/", 404, NOT_FOUND, body({}), path="/process/"),
    Bad("GET /results/", 404, NOT_FOUND, method="GET", path="/results/"),
    Bad("POST /tasks", 404, NOT_FOUND, body({}), path="/tasks"),
]


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

# Every string field carrying SQL: stored verbatim, or rejected.
INJECTIONS = [
    ("data value", {"data": {"s": INJECTION}}, {}, 202),
    ("data key", {"data": {INJECTION: 1}}, {}, 202),
    ("nested data value", {"data": {"a": [{"b": INJECTION}]}}, {}, 202),
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
        envelope = len(body({"data": {"s": ""}}))
        over = client.post("/process", data=body({"data": {"s": "x" * ((1 << 20) - envelope + 1)}}), content_type="application/json")
        assert over.status_code == 413
        assert over.get_json()["error"]["code"] == "body_too_large"
        assert count_tasks(clean_db) == 0
        at_limit = client.post("/process", data=body({"data": {"s": "x" * ((1 << 20) - envelope)}}), content_type="application/json")
        assert at_limit.status_code == 202
    finally:
        app.extensions["asyncproc"].close()


def test_unicode_and_big_numbers_are_stored_exactly_as_sent(client, clean_db):
    data = {"text": "naïve café 中文 🚀 \u202e", "key 🔑": [12345.678, -(10**40), 10**40, 0.1, 1e-300]}
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
