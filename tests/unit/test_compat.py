"""The seed's shapes, from asyncproc's: statuses, timestamps and FastAPI's `detail`."""

from __future__ import annotations

import pytest

from asyncproc.api.compat import seed_detail, seed_task, seed_timestamp


def document(**changes) -> dict:
    base = {
        "task_id": "0d6f0a1e-5c1b-4f5e-9a55-2b0c8d1b6a41",
        "status": "completed",
        "result": 499999500000,
        "error_message": None,
        "created_at": "2026-11-28T00:50:31.042043+00:00",
        "completed_at": "2026-11-28T00:50:31.053359+00:00",
        "operation": "compute",
        "attempts": 1,
        "started_at": "2026-11-28T00:50:31.050537+00:00",
        "scheduled_at": "2026-11-28T00:50:31.042043+00:00",
    }
    return {**base, **changes}


@pytest.mark.parametrize(
    "sent,seed",
    [
        ("2026-11-28T00:50:31.042043+00:00", "2026-11-28T00:50:31.042043"),
        # isoformat() drops a zero fraction; the seed's format always has six digits.
        ("2026-11-28T00:50:31+00:00", "2026-11-28T00:50:31.000000"),
        # Another offset is the same instant in UTC.
        ("2026-11-28T02:50:31.5+02:00", "2026-11-28T00:50:31.500000"),
    ],
)
def test_timestamps_are_naive_utc_with_microseconds(sent, seed):
    assert seed_timestamp(sent) == seed


def test_a_finished_task_keeps_its_fields_with_the_seeds_timestamps():
    seed = seed_task(document())
    assert seed == document(
        created_at="2026-11-28T00:50:31.042043",
        completed_at="2026-11-28T00:50:31.053359",
        started_at="2026-11-28T00:50:31.050537",
        scheduled_at="2026-11-28T00:50:31.042043",
    )
    assert type(seed["result"]) is int


def test_a_running_task_is_pending_to_the_seed():
    seed = seed_task(document(status="running", completed_at=None, result=None))
    assert seed["status"] == "pending"
    assert seed["completed_at"] is None


@pytest.mark.parametrize(
    "last_error,message",
    [(None, "Task was cancelled"), ("RuntimeError: flaky", "Task was cancelled (last error: RuntimeError: flaky)")],
)
def test_a_cancelled_task_is_failed_and_says_it_was_cancelled(last_error, message):
    seed = seed_task(document(status="cancelled", result=None, error_message=last_error))
    assert (seed["status"], seed["error_message"]) == ("failed", message)


@pytest.mark.parametrize("status", ["pending", "completed", "failed"])
def test_the_seeds_own_statuses_are_unchanged(status):
    assert seed_task(document(status=status))["status"] == status


def test_an_unknown_task_is_fastapis_string():
    assert seed_detail(404, {"code": "task_not_found", "message": "No task with id 'x'"}, {}) == "Task not found"


def test_other_errors_carry_their_message_as_a_string():
    error = {"code": "unsupported_media_type", "message": "Send the body as application/json"}
    assert seed_detail(415, error, {}) == "Send the body as application/json"


def test_a_422_is_fastapis_list_with_each_problem_located():
    error = {
        "code": "invalid_request",
        "message": "data.n must be of type integer",
        "details": [
            {"field": "data.n", "problem": "must be of type integer"},
            {"field": "priority"},
            {"field": "Idempotency-Key"},
            {"field": "wait"},
        ],
    }
    sources = {"Idempotency-Key": "header", "wait": "query"}
    assert seed_detail(422, error, sources) == [
        {"type": "value_error", "loc": ["body", "data", "n"], "msg": "must be of type integer"},
        {"type": "value_error", "loc": ["body", "priority"], "msg": "data.n must be of type integer"},
        {"type": "value_error", "loc": ["header", "Idempotency-Key"], "msg": "data.n must be of type integer"},
        {"type": "value_error", "loc": ["query", "wait"], "msg": "data.n must be of type integer"},
    ]


def test_a_422_without_details_is_one_problem_with_the_message():
    error = {"code": "invalid_request", "message": "The JSON body must be an object"}
    assert seed_detail(422, error, {}) == [
        {"type": "value_error", "loc": ["body"], "msg": "The JSON body must be an object"}
    ]


def test_a_batch_items_problems_are_located_inside_the_batch():
    error = {
        "code": "invalid_request",
        "message": "tasks[3]: operation must be ...",
        "details": {"index": 3, "problems": [{"field": "operation"}]},
    }
    assert seed_detail(422, error, {}) == [
        {"type": "value_error", "loc": ["body", "tasks", 3, "operation"], "msg": "tasks[3]: operation must be ..."}
    ]
