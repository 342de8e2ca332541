"""ASYNCPROC_COMPAT=seed, in process: every error in FastAPI's shape, and the seed's health."""

from __future__ import annotations

import pytest

from asyncproc.api import create_app
from asyncproc.config import ApiSettings, CacheSettings, DatabaseSettings, Settings
from tests.support import BAD_REQUESTS, UNREACHABLE_DB, count_tasks, post


@pytest.fixture(scope="module")
def seed_client(database_url, redis_url):
    app = create_app(Settings(db=DatabaseSettings(url=database_url), cache=CacheSettings(url=redis_url), api=ApiSettings(max_body_bytes=8192, compat="seed")))
    yield app.test_client()
    app.extensions["asyncproc"].close()


@pytest.mark.parametrize("bad", BAD_REQUESTS, ids=[bad.name for bad in BAD_REQUESTS])
def test_every_bad_request_keeps_its_status_and_carries_only_detail(seed_client, clean_db, bad):
    response = seed_client.open(
        bad.path, method=bad.method, data=bad.body, content_type=bad.content_type, headers=bad.headers
    )
    assert response.status_code == bad.status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    document = response.get_json()
    assert set(document) == {"detail"}
    if bad.status == 422:
        assert document["detail"] and all(
            set(problem) == {"type", "loc", "msg"} and problem["loc"][0] in ("body", "header") and problem["msg"]
            for problem in document["detail"]
        ), document
    elif bad.code == "task_not_found":
        assert document["detail"] == "Task not found"
    else:
        assert isinstance(document["detail"], str) and document["detail"]
    if bad.status == 405:
        assert response.headers["Allow"]
    assert count_tasks(clean_db) == 0


def test_without_a_database_health_is_503_unavailable_and_errors_carry_detail():
    blind = create_app(Settings(db=DatabaseSettings(url=UNREACHABLE_DB, connect_timeout=1), api=ApiSettings(compat="seed")))
    try:
        client = blind.test_client()
        health = client.get("/health")
        assert (health.status_code, health.get_json()) == (503, {"status": "unavailable"})
        accepted = post(client, {"data": {}})
        assert accepted.status_code == 503
        assert set(accepted.get_json()) == {"detail"} and accepted.get_json()["detail"]
    finally:
        blind.extensions["asyncproc"].close()


def test_asyncproc_own_routes_keep_their_shapes(seed_client, clean_db):
    batch = seed_client.post("/process/batch", json={"tasks": [{"data": {}}]})
    assert batch.status_code == 202
    task_id = batch.get_json()["tasks"][0]["task_id"]
    cancelled = seed_client.post(f"/results/{task_id}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.get_json()["status"] == "cancelled"
    assert seed_client.get(f"/results/{task_id}").get_json()["status"] == "failed"
