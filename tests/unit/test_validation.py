from __future__ import annotations

from datetime import datetime, timezone

import pytest

from asyncproc.api import validation
from asyncproc.errors import InvalidRequest, MalformedBody, TaskNotFound


def make(body, **kwargs):
    return validation.new_task(body, idempotency_key=None, request_id=None, **kwargs)


def test_the_seed_body_becomes_a_compute_task_with_the_other_keys_as_input():
    task = make({"data": {"input": 42, "operation": "compute"}})
    assert task.operation == "compute"
    assert task.payload == {"input": 42}
    assert task.max_attempts == 3 and task.priority == 0 and task.run_at is None


def test_operation_defaults_to_compute_and_may_be_top_level():
    assert make({}).operation == "compute"
    assert make({"operation": "sleep", "data": {"seconds": 1}}).operation == "sleep"
    assert make({"operation": "sleep", "data": {"operation": "sleep"}}).operation == "sleep"


def test_run_at_accepts_utc_and_naive_timestamps():
    task = make({"run_at": "2030-01-01T00:00:00Z"})
    assert task.run_at == datetime(2030, 1, 1, tzinfo=timezone.utc)
    assert make({"run_at": "2030-01-01T00:00:00"}).run_at == task.run_at


def test_delay_seconds_is_relative_to_now():
    before = datetime.now(timezone.utc)
    task = make({"delay_seconds": 30})
    assert 29 <= (task.run_at - before).total_seconds() <= 31


@pytest.mark.parametrize("raw", [b"", b"  ", b"{", b"[1,", b'{"a": NaN}', b'{"a": Infinity}', b"\xff\xfe"])
def test_unparseable_bodies_are_malformed(raw):
    with pytest.raises(MalformedBody):
        validation.parse_json_body(raw)


def test_huge_integers_that_postgres_can_store_are_kept():
    body = validation.parse_json_body(b'{"data": {"input": 123456789012345678901234567890}}')
    assert make(body).payload == {"input": 123456789012345678901234567890}


@pytest.mark.parametrize("value", ["ok\x00", "\ud800", float("nan")])
def test_values_jsonb_cannot_store_are_rejected(value):
    with pytest.raises(InvalidRequest):
        make({"data": {"input": value}})


def test_header_tokens_are_printable_ascii():
    assert validation.header_token("abc-123", "Idempotency-Key") == "abc-123"
    assert validation.header_token(None, "Idempotency-Key") is None
    for bad in ("", "has space", "x" * 256, "naïve"):
        with pytest.raises(InvalidRequest, match="Idempotency-Key"):
            validation.header_token(bad, "Idempotency-Key")


def test_a_malformed_task_id_is_not_found():
    with pytest.raises(TaskNotFound):
        validation.task_id("12345")


def test_a_callback_url_needs_a_signing_secret_and_an_allowed_host():
    body = {"callback_url": "https://hooks.example.com/done"}
    with pytest.raises(InvalidRequest, match="needs an API key"):
        make(body)
    assert make(body, can_sign=True).callback_url == "https://hooks.example.com/done"
    with pytest.raises(InvalidRequest, match="not public"):
        make({"callback_url": "http://127.0.0.1:8080/"}, can_sign=True)
    assert make({}, can_sign=True).callback_url is None
