"""The attempts ledger: one row per run, written with the status change, read over HTTP and SQL, pruned with its task."""

from __future__ import annotations

import socket
from datetime import datetime

import pytest
import requests

from tests.conftest import wait_for

pytestmark = pytest.mark.e2e


def _attempts(service, task_id: str) -> list[dict]:
    response = requests.get(f"{service.base_url}/results/{task_id}/attempts", timeout=10)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["task_id"] == task_id
    return body["attempts"]


def test_each_run_is_a_row_with_its_worker_times_outcome_and_error(service, conn):
    task_id = service.submit({"operation": "fail", "data": {"times": 1, "message": "flaky"}})
    assert service.wait_finished(task_id)["status"] == "completed"

    runs = _attempts(service, task_id)
    assert [(run["attempt"], run["outcome"], run["error"], run["counted"]) for run in runs] == [
        (1, "retried", "RuntimeError: flaky", True),
        (2, "completed", None, True),
    ]
    worker = conn.execute(
        "SELECT worker_id, pid FROM asyncproc_attempts WHERE task_id = %s ORDER BY id LIMIT 1", (task_id,)
    ).fetchone()
    for run in runs:
        assert run["host"] == socket.gethostname()
        assert run["pid"] == worker["pid"] and run["worker_id"] == worker["worker_id"]
        assert datetime.fromisoformat(run["started_at"]) <= datetime.fromisoformat(run["finished_at"])
    assert datetime.fromisoformat(runs[0]["finished_at"]) <= datetime.fromisoformat(runs[1]["started_at"])

    # The documented view says the same.
    rows = conn.execute(
        "SELECT attempt, outcome, error, counted FROM asyncproc_task_attempts WHERE task_id = %s ORDER BY started_at",
        (task_id,),
    ).fetchall()
    assert [tuple(row.values()) for row in rows] == [(1, "retried", "RuntimeError: flaky", True), (2, "completed", None, True)]


def test_a_running_task_shows_its_open_run_and_a_cancel_closes_it(service, conn):
    task_id = service.submit({"operation": "sleep", "data": {"seconds": 30}})
    wait_for(lambda: _attempts(service, task_id), 10, "the run to be recorded", interval=0.05)
    (run,) = _attempts(service, task_id)
    assert (run["attempt"], run["outcome"], run["finished_at"]) == (1, "running", None)

    assert requests.post(f"{service.base_url}/results/{task_id}/cancel", timeout=10).status_code == 200
    (run,) = _attempts(service, task_id)
    assert run["outcome"] == "cancelled" and run["finished_at"] is not None


def test_the_runs_go_with_their_task(service, conn):
    task_id = service.submit({"operation": "compute", "data": {"n": 3}})
    assert service.wait_finished(task_id)["status"] == "completed"
    assert len(_attempts(service, task_id)) == 1
    conn.execute("DELETE FROM tasks WHERE task_id = %s", (task_id,))
    assert conn.execute("SELECT count(*) AS n FROM asyncproc_attempts WHERE task_id = %s", (task_id,)).fetchone()["n"] == 0


def test_an_unknown_task_has_no_attempts_and_answers_404(service):
    response = requests.get(f"{service.base_url}/results/00000000-0000-7000-8000-000000000000/attempts", timeout=10)
    assert response.status_code == 404
    assert response.json()["error"]["code"]
