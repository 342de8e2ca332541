"""Strict input: UTF-8 only, no NUL anywhere, bounded answers to unbounded mistakes."""

from __future__ import annotations

import json
import logging
from typing import Iterator

import pytest
from flask import Flask

from asyncproc.api import create_app
from asyncproc.config import DatabaseSettings, Settings


@pytest.fixture(scope="module")
def app(database_url) -> Iterator[Flask]:
    application = create_app(Settings(db=DatabaseSettings(url=database_url)))
    yield application
    application.extensions["asyncproc"].close()


def _post(app: Flask, raw: bytes):
    return app.test_client().post("/process", data=raw, content_type="application/json")


@pytest.mark.parametrize(
    "raw",
    [
        '{"data": {"n": 3}}'.encode("utf-16"),
        '{"data": {"n": 3}}'.encode("utf-16-le"),
        '{"data": {"n": 3}}'.encode("utf-32"),
        b"\xef\xbb\xbf" + b'{"data": {"n": 3}}',
        b'{"data": {"s": "\xff"}}',
    ],
    ids=["utf-16", "utf-16-le", "utf-32", "utf-8 with bom", "not utf-8"],
)
def test_only_utf8_without_a_bom_is_accepted(app, clean_db, raw):
    response = _post(app, raw)
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "malformed_body"
    assert clean_db.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"] == 0


@pytest.mark.parametrize(
    "body",
    [
        {"data": {"n": 3}, "run_at": "2030-01-01T00:00:00\u0000Z"},
        {"data": {"n": 3}, "operation": "compute\u0000"},
        {"data": {"n": 3, "operation": "comp\u0000ute"}},
    ],
    ids=["run_at", "operation", "data.operation"],
)
def test_a_nul_is_refused_in_every_field(app, clean_db, body):
    response = _post(app, json.dumps(body).encode())
    assert response.status_code == 422
    assert response.get_json()["error"]["code"] == "invalid_request"
    assert clean_db.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"] == 0


def test_a_body_of_unknown_fields_gets_a_short_422_and_a_short_log_line(app, caplog):
    body = {"data": {}, **{f"field{index:05d}": 1 for index in range(60_000)}}
    with caplog.at_level(logging.WARNING):
        response = _post(app, json.dumps(body).encode())
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert len(response.data) < 5_000
    assert len([item for item in error["details"] if "field" in item]) == 20
    assert "and 59980 more" in error["message"]
    assert max(len(record.getMessage()) for record in caplog.records) < 5_000


@pytest.mark.parametrize(
    ("first", "again", "replayed"),
    [
        ({"data": {"input": 1e23}}, {"data": {"input": 1e23}}, True),
        ('{"data": {"input": 1e23}}', '{"data": {"input": 100000000000000000000000}}', True),
        ({"data": {"n": 3}}, {"data": {"n": 3}, "max_attempts": 3}, True),
        ({"data": {"n": 3}, "run_at": "2030-01-01T00:00:00Z"}, {"data": {"n": 3}, "run_at": "2030-01-01T00:00:00+00:00"}, True),
        ({"data": {"n": 3}, "run_at": "2030-01-01T00:00:00Z"}, {"data": {"n": 3}, "run_at": "2030-01-02T00:00:00Z"}, False),
        ({"data": {"n": 3}, "delay_seconds": 60}, {"data": {"n": 3}, "delay_seconds": 61}, False),
        ({"data": {"n": 3}}, {"data": {"n": 3}, "delay_seconds": 60}, False),
        ({"data": {"input": 3}}, {"data": {"input": "3"}}, False),
    ],
    ids=["big float", "big float as integer", "default spelled out", "same instant", "run_at changed",
         "delay changed", "delay added", "number vs string"],
)
def test_a_replay_compares_the_whole_request_by_value(app, clean_db, first, again, replayed):
    def send(body):
        raw = body if isinstance(body, str) else json.dumps(body)
        return app.test_client().post(
            "/process", data=raw, content_type="application/json", headers={"Idempotency-Key": "replay-1"}
        )

    original = send(first)
    assert original.status_code == 202
    answer = send(again)
    if replayed:
        assert answer.status_code == 200
        assert answer.get_json()["task_id"] == original.get_json()["task_id"]
    else:
        assert answer.status_code == 409
        assert answer.get_json()["error"]["code"] == "conflict"
    assert clean_db.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"] == 1


def test_404_and_405_are_worded_like_every_other_error(app):
    client = app.test_client()
    missing = client.get("/nowhere")
    assert missing.status_code == 404
    assert missing.get_json()["error"] == {"code": "not_found", "message": "No route GET /nowhere; see /openapi.json"}
    wrong = client.delete("/process")
    assert wrong.status_code == 405
    assert wrong.get_json()["error"] == {"code": "method_not_allowed", "message": "DELETE is not allowed on /process; use POST"}
