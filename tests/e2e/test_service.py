"""End to end: HTTP in, real worker process, results out."""

from __future__ import annotations

import subprocess
import threading
import uuid
from datetime import datetime

import pytest
import requests

from asyncproc.embedded import find_bindir
from tests.conftest import wait_for
from tests.e2e.conftest import start_service, stop_service

pytestmark = pytest.mark.e2e


def test_the_seed_example_completes_with_the_seed_result(service, conn):
    response = service.post({"data": {"input": 42, "operation": "compute"}})
    assert response.status_code == 202
    task_id = response.json()["task_id"]
    assert response.json() == {"task_id": task_id, "status": "pending", "message": "Task queued for processing"}

    body = service.wait_finished(task_id)
    assert body["status"] == "completed"
    assert body["result"] == 499999500000
    assert body["error_message"] is None
    assert body["attempts"] == 1
    created, started, completed = (datetime.fromisoformat(body[k]) for k in ("created_at", "started_at", "completed_at"))
    assert created <= started <= completed
    # Finished jobs do not pile up in Procrastinate's table: the worker deletes
    # the job just after it records the outcome.
    wait_for(
        lambda: conn.execute(
            "SELECT count(*) AS n FROM procrastinate_jobs WHERE args->>'task_id' = %s", (task_id,)
        ).fetchone()["n"] == 0,
        5,
        "the finished task's job to be deleted",
        interval=0.02,
    )


def test_a_task_that_fails_twice_succeeds_on_the_third_attempt(service):
    task_id = service.submit({"data": {"operation": "fail", "times": 2, "message": "flaky"}})
    body = service.wait_finished(task_id)
    assert body["status"] == "completed"
    assert body["attempts"] == 3
    assert body["result"] == {"succeeded_on_attempt": 3}
    assert body["error_message"] == "RuntimeError: flaky"


def test_a_task_that_always_fails_ends_failed_after_max_attempts(service):
    task_id = service.submit({"operation": "fail", "data": {"message": "broken"}, "max_attempts": 3})
    body = service.wait_finished(task_id)
    assert body["status"] == "failed"
    assert body["attempts"] == 3
    assert body["error_message"] == "RuntimeError: broken"
    assert body["completed_at"] is not None


@pytest.mark.parametrize(
    "body,field",
    [({"data": {"operation": "compute", "n": "many"}}, "data.n"), ({"operation": "no_such_thing"}, "operation")],
    ids=["bad input", "unknown operation"],
)
def test_the_api_refuses_what_the_worker_could_not_run(service, body, field):
    response = service.post(body)
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["field"] == field


def test_a_psql_insert_with_input_the_api_would_refuse_fails_at_once_without_retries(service, conn):
    # An unknown operation waits for a worker that knows it instead (tests/e2e/test_isolation.py).
    task_id = conn.execute(
        "INSERT INTO tasks (operation, payload) VALUES ('compute', '{\"n\": \"many\"}') RETURNING task_id"
    ).fetchone()["task_id"]
    body = service.wait_finished(str(task_id))
    assert body["status"] == "failed"
    assert body["attempts"] == 1
    assert "data.n must be of type integer" in body["error_message"]


def test_operations_from_the_users_own_module_run(service):
    shouted = service.wait_finished(service.submit({"operation": "shout", "data": {"text": "hi"}}))
    assert shouted["status"] == "completed"
    assert shouted["result"] == {"text": "HI", "attempt": 1}
    echoed = service.wait_finished(service.submit({"operation": "async_echo", "data": {"k": [1, 2]}}))
    assert echoed["result"] == {"k": [1, 2]}


def test_a_psql_insert_runs_with_no_api_involved(service, database_url):
    psql = str(find_bindir() / "psql")
    result = subprocess.run(
        [psql, database_url, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c",
         """INSERT INTO tasks (operation, payload) VALUES ('compute', '{"n": 10}') RETURNING task_id"""],
        capture_output=True, text=True, check=True,
    )
    task_id = result.stdout.strip().splitlines()[0]
    body = service.wait_finished(task_id)
    assert body["status"] == "completed"
    assert body["result"] == 45


def test_unknown_and_malformed_ids_are_404_over_http(service):
    for raw in (str(uuid.uuid4()), "definitely-not-a-uuid"):
        response = service.get(raw)
        assert response.status_code == 404
        assert response.headers["Content-Type"] == "application/json"
        assert response.json()["error"]["code"] == "task_not_found"


def test_twenty_one_second_sleeps_run_at_once_on_a_worker_of_concurrency_20(service, conn):
    # One request queues all twenty at once: twenty requests one after another on
    # a loaded machine took longer than a sleep, and measured the API, not the worker.
    items = [{"data": {"operation": "sleep", "seconds": 1}} for _ in range(20)]
    response = requests.post(f"{service.base_url}/process/batch", json={"tasks": items}, timeout=10)
    assert response.status_code == 202, response.text
    task_ids = [item["task_id"] for item in response.json()["tasks"]]
    for task_id in task_ids:
        assert service.wait_finished(task_id, timeout=30)["status"] == "completed"
    span = conn.execute(
        "SELECT max(started_at) < min(completed_at) AS overlapped,"
        " extract(epoch FROM max(completed_at) - min(started_at)) AS seconds"
        " FROM tasks WHERE task_id = ANY(%s::uuid[])",
        (task_ids,),
    ).fetchone()
    # Every sleep started before any finished: all twenty ran at the same time,
    # so the batch took about one second, not four or more.
    assert span["overlapped"], span


def test_with_redis_down_the_service_still_works(tmp_path, database_url):
    dead_redis = "redis://127.0.0.1:1/0"
    service, processes = start_service(tmp_path, database_url, dead_redis, concurrency=2)
    try:
        task_id = service.submit({"data": {"input": 42, "operation": "compute"}})
        body = service.wait_finished(task_id)
        assert body["status"] == "completed" and body["result"] == 499999500000
        assert service.get(task_id).json() == body
        health = service.health()
        assert health.status_code == 200
        assert health.json() == {"status": "ok", "database": "ok", "cache": "down", "listener": "ok"}
    finally:
        assert stop_service(processes) == [0, 0]


def test_concurrent_identical_requests_with_one_idempotency_key_make_one_task(service, conn):
    idempotency_key = f"race-{uuid.uuid4()}"
    barrier = threading.Barrier(32)
    responses: list[requests.Response] = []

    def send() -> None:
        barrier.wait(10)
        responses.append(service.post({"data": {"n": 7}}, headers={"Idempotency-Key": idempotency_key}))

    threads = [threading.Thread(target=send) for _ in range(barrier.parties)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(r.status_code for r in responses) == [200] * (barrier.parties - 1) + [202]
    assert len({r.json()["task_id"] for r in responses}) == 1
    rows = conn.execute("SELECT task_id FROM tasks WHERE idempotency_key = %s", (idempotency_key,)).fetchall()
    assert [str(row["task_id"]) for row in rows] == [responses[0].json()["task_id"]]
    different = service.post({"data": {"n": 8}}, headers={"Idempotency-Key": idempotency_key})
    assert different.status_code == 409
