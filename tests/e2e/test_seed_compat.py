"""The seed's own five checks, run strictly against asyncproc in ASYNCPROC_COMPAT=seed.

The seed's test_async_processor.py swallowed every exception, so it passed
whatever the service did. Here each check is a real test. Two APIs share one
database and one worker: one in compat mode, which the seed's checks call, and
one in the default mode, so that the same task is seen through both contracts
and the default is shown to keep asyncproc's own.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Iterator

import pytest
import requests

from tests.conftest import free_port, wait_for
from tests.e2e.conftest import FINAL, Service, _healthy, _start, service_env, stop_service

pytestmark = pytest.mark.e2e

SEED_STATUSES = {"pending", "completed", "failed"}
SEED_FIELDS = {"task_id", "status", "result", "error_message", "created_at", "completed_at"}
# The seed README's example: "2025-10-02T10:30:00.123456".
SEED_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}$")
SEED_EXAMPLE = {"data": {"input": 42, "operation": "compute"}}
# Long enough to still be running when the test looks; every test cancels its own.
LONG_SLEEP = {"operation": "sleep", "data": {"seconds": 60}}


@dataclass
class Both:
    seed: Service
    native: Service


@pytest.fixture(scope="module")
def both(tmp_path_factory, database_url, redis_url) -> Iterator[Both]:
    logs = tmp_path_factory.mktemp("seed-compat")
    env = service_env(database_url, redis_url)
    urls = {"native": f"http://127.0.0.1:{free_port()}", "seed": f"http://127.0.0.1:{free_port()}"}
    processes = [
        _start(["api", "--bind", urls["native"].removeprefix("http://"), "--workers", "1"], env, logs / "native-api.log"),
        _start(
            ["api", "--bind", urls["seed"].removeprefix("http://"), "--workers", "1"],
            {**env, "ASYNCPROC_COMPAT": "seed"},
            logs / "seed-api.log",
        ),
        _start(["worker", "--concurrency", "4"], env, logs / "worker.log"),
    ]
    for url in urls.values():
        wait_for(lambda: _healthy(url), 30, f"the API at {url} (logs in {logs})", interval=0.1)
    yield Both(seed=Service(urls["seed"], logs), native=Service(urls["native"], logs))
    assert stop_service(processes) == [0, 0, 0], f"a process did not exit cleanly; logs in {logs}"


def native_status(both: Both, task_id: str) -> str:
    return both.native.get(task_id).json()["status"]


def cancel(both: Both, task_id: str) -> None:
    response = requests.post(f"{both.native.base_url}/results/{task_id}/cancel", timeout=10)
    assert response.status_code == 200, response.text


def poll_seed_until_finished(both: Both, task_id: str) -> tuple[dict, set[str]]:
    """Poll the compat API as a seed client does: (the last document, every status seen)."""
    seen: set[str] = set()

    def finished():
        response = both.seed.get(task_id)
        assert response.status_code == 200, response.text
        body = response.json()
        seen.add(body["status"])
        return body if body["status"] != "pending" else None

    return wait_for(finished, 20, f"task {task_id} to finish (logs in {both.seed.logs})", interval=0.02), seen


# --- The seed's five checks ------------------------------------------------------


def test_health_check(both):
    response = both.seed.health()
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_create_task_answers_200_at_once(both, conn):
    response = both.seed.post(SEED_EXAMPLE)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body == {"task_id": body["task_id"], "status": "pending", "message": "Task queued for processing"}
    assert response.headers["Location"] == f"/results/{body['task_id']}"
    # Non-blocking: the answer comes before the work is done, even for work that takes a minute.
    slow = both.seed.post(LONG_SLEEP)
    assert slow.status_code == 200 and slow.json()["status"] == "pending"
    slow_id = slow.json()["task_id"]
    assert conn.execute("SELECT status FROM tasks WHERE task_id = %s", (slow_id,)).fetchone()["status"] not in FINAL
    cancel(both, slow_id)


def test_get_task_status_shows_only_the_seeds_three_statuses(both):
    task_id = both.seed.post(LONG_SLEEP).json()["task_id"]
    wait_for(lambda: native_status(both, task_id) == "running", 20, f"task {task_id} to start", interval=0.02)

    running = both.seed.get(task_id)
    assert running.status_code == 200
    assert SEED_FIELDS <= set(running.json())
    assert running.json()["status"] == "pending"

    cancel(both, task_id)
    assert native_status(both, task_id) == "cancelled"
    cancelled = both.seed.get(task_id).json()
    assert cancelled["status"] == "failed"
    assert cancelled["error_message"] == "Task was cancelled"


def test_complete_workflow(both):
    task_id = both.seed.post(SEED_EXAMPLE).json()["task_id"]
    body, seen = poll_seed_until_finished(both, task_id)
    assert seen <= SEED_STATUSES
    assert body["status"] == "completed"
    assert body["result"] == 499999500000 and type(body["result"]) is int
    assert body["error_message"] is None
    assert SEED_TIMESTAMP.match(body["created_at"]) and SEED_TIMESTAMP.match(body["completed_at"])
    assert datetime.fromisoformat(body["created_at"]) <= datetime.fromisoformat(body["completed_at"])
    # The second read comes from the results cache, in the same shape.
    assert both.seed.get(task_id).json() == body

    failing = both.seed.post({"operation": "fail", "data": {"message": "broken"}, "max_attempts": 1}).json()["task_id"]
    failed, seen = poll_seed_until_finished(both, failing)
    assert seen <= SEED_STATUSES
    assert (failed["status"], failed["error_message"]) == ("failed", "RuntimeError: broken")


def test_nonexistent_task(both):
    for unknown in (str(uuid.uuid4()), "not-a-task-id"):
        response = both.seed.get(unknown)
        assert response.status_code == 404
        assert response.json() == {"detail": "Task not found"}
        assert "not found" in response.json()["detail"].lower()


# --- Beyond the five: the rest of the seed's contract in compat mode ---------------


def test_a_422_is_fastapis_list_of_located_problems(both):
    response = both.seed.post({"data": {"operation": "compute", "n": "many"}})
    assert response.status_code == 422
    assert response.json() == {
        "detail": [{"type": "value_error", "loc": ["body", "data", "n"], "msg": "must be of type integer"}]
    }


def test_other_errors_carry_a_string_detail(both):
    wrong_type = requests.post(f"{both.seed.base_url}/process", data="{}", headers={"Content-Type": "text/plain"}, timeout=10)
    assert wrong_type.status_code == 415
    assert wrong_type.json() == {"detail": "Send the body as application/json"}
    nowhere = requests.get(f"{both.seed.base_url}/nowhere", timeout=10)
    assert nowhere.status_code == 404 and isinstance(nowhere.json()["detail"], str)


def test_a_repeated_idempotency_key_is_200_with_the_seeds_body(both):
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first, again = (both.seed.post(SEED_EXAMPLE, headers=key) for _ in range(2))
    assert (first.status_code, again.status_code) == (200, 200)
    assert again.json()["task_id"] == first.json()["task_id"]
    assert again.json()["status"] in SEED_STATUSES
    assert again.headers["Idempotent-Replayed"] == "true"


def test_a_long_poll_answers_in_the_seeds_shape(both):
    task_id = both.seed.post(SEED_EXAMPLE).json()["task_id"]
    body = requests.get(f"{both.seed.base_url}/results/{task_id}?wait=20", timeout=30).json()
    assert body["status"] == "completed"
    assert SEED_TIMESTAMP.match(body["completed_at"])


# --- The default mode keeps asyncproc's own contract --------------------------------


def test_default_mode_answers_202_with_location(both):
    response = both.native.post(SEED_EXAMPLE)
    assert response.status_code == 202
    assert response.headers["Location"] == f"/results/{response.json()['task_id']}"


def test_default_mode_shows_running_and_cancelled(both):
    task_id = both.native.submit(LONG_SLEEP)
    wait_for(lambda: native_status(both, task_id) == "running", 20, f"task {task_id} to start", interval=0.02)
    cancel(both, task_id)
    body = both.native.get(task_id).json()
    assert body["status"] == "cancelled"
    assert datetime.fromisoformat(body["created_at"]).utcoffset() is not None


def test_default_mode_errors_are_the_error_object_with_detail(both):
    response = both.native.get(str(uuid.uuid4()))
    assert response.status_code == 404
    body = response.json()
    assert set(body) == {"error", "detail"}
    assert body["error"]["code"] == "task_not_found"
    assert body["detail"] == body["error"]["message"]


def test_default_mode_health_reports_database_and_cache(both):
    response = both.native.health()
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok", "cache": "ok", "listener": "ok"}
