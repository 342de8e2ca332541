"""Operators over psql, HTTP and the CLI, and results without polling."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest
import requests

from asyncproc.embedded import find_bindir
from tests.conftest import wait_for
from tests.support import bare_env

pytestmark = pytest.mark.e2e


def psql(database_url: str, sql: str) -> str:
    result = subprocess.run(
        [str(find_bindir() / "psql"), database_url, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def cli(database_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "asyncproc.cli", *args],
        env=bare_env(DATABASE_URL=database_url), capture_output=True, text=True,
    )


def failed_once(service) -> str:
    """A task that failed its only attempt and would succeed on the next."""
    task_id = service.submit({"operation": "fail", "data": {"times": 1, "message": "first try"}, "max_attempts": 1})
    assert service.wait_finished(task_id)["status"] == "failed"
    return task_id


def test_a_psql_retry_is_visible_over_http_within_a_second_even_when_cached(service, database_url):
    task_id = failed_once(service)
    assert service.get(task_id).json()["status"] == "failed"  # now cached in Redis
    psql(database_url, f"SELECT status FROM asyncproc_retry('{task_id}')")
    changed_at = time.monotonic()
    seen = wait_for(
        lambda: (body := service.get(task_id).json())["status"] != "failed" and body, 1.0, "the retry to show over HTTP"
    )
    assert time.monotonic() - changed_at < 1.0
    assert seen["status"] in ("pending", "running", "completed")
    assert service.wait_finished(task_id)["status"] == "completed"
    assert service.get(task_id).json()["attempts"] == 2


def completed(service, task_id: str) -> dict:
    """The task's document once it has completed.

    Right after a psql change, GET may still serve the old final state for
    the moment the API needs to hear of it (within a second), so waiting for
    any final state could return the old one.
    """
    return wait_for(
        lambda: (body := service.get(task_id).json())["status"] == "completed" and body,
        20,
        f"task {task_id} to complete (logs in {service.logs})",
        interval=0.05,
    )


def test_the_plain_update_an_operator_types_first_requeues(service, database_url):
    task_id = failed_once(service)
    assert psql(database_url, f"UPDATE tasks SET status = 'pending' WHERE status = 'failed' AND task_id = '{task_id}'") == "UPDATE 1"
    assert completed(service, task_id)["attempts"] == 2


def test_a_retried_task_is_picked_up_at_once(service, database_url, conn):
    waits = []
    for _ in range(20):
        task_id = failed_once(service)
        psql(database_url, f"SELECT status FROM asyncproc_retry('{task_id}')")
        completed(service, task_id)
        row = conn.execute(
            "SELECT extract(epoch FROM started_at - scheduled_at) AS wait FROM tasks WHERE task_id = %s", (task_id,)
        ).fetchone()
        waits.append(row["wait"])
    waits.sort()
    p95 = waits[int(len(waits) * 0.95) - 1]
    print(f"retry pick-up: p50 {waits[len(waits) // 2] * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms")
    assert p95 < 0.2, waits


def test_http_retry_and_cancel(service):
    task_id = failed_once(service)
    retried = requests.post(f"{service.base_url}/results/{task_id}/retry", timeout=10)
    assert retried.status_code == 202 and retried.json()["status"] == "pending"
    assert service.wait_finished(task_id)["status"] == "completed"
    again = requests.post(f"{service.base_url}/results/{task_id}/retry", timeout=10)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "invalid_transition"

    later = service.submit({"operation": "sleep", "data": {"seconds": 0}, "delay_seconds": 3600})
    cancelled = requests.post(f"{service.base_url}/results/{later}/cancel", timeout=10)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    missing = requests.post(f"{service.base_url}/results/00000000-0000-4000-8000-000000000000/cancel", timeout=10)
    assert missing.status_code == 404


def test_cancelling_a_running_task_stops_its_handler(service, conn):
    task_id = service.submit({"operation": "steps", "data": {"count": 100, "seconds": 0.2}})
    wait_for(lambda: service.get(task_id).json()["status"] == "running" or None, 10, "the task to start",)
    response = requests.post(f"{service.base_url}/results/{task_id}/cancel", timeout=10)
    assert response.status_code == 200
    body = service.wait_finished(task_id)
    assert body["status"] == "cancelled" and body["attempts"] == 1 and body["result"] is None
    # The worker let go of it: no job is left running for it.
    wait_for(
        lambda: conn.execute(
            "SELECT count(*) = 0 AS gone FROM procrastinate_jobs WHERE status = 'doing' AND args->>'task_id' = %s",
            (task_id,),
        ).fetchone()["gone"],
        10,
        "the running job to end",
    )


def test_the_cli_retries_and_cancels(service, database_url):
    task_id = failed_once(service)
    retried = cli(database_url, "retry", task_id)
    assert retried.returncode == 0, retried.stderr
    assert json.loads(retried.stdout)["status"] == "pending"
    assert service.wait_finished(task_id)["status"] == "completed"

    refused = cli(database_url, "retry", task_id)
    assert refused.returncode == 1
    assert "only failed or cancelled tasks can be retried" in refused.stderr

    ids = [failed_once(service) for _ in range(2)]
    bulk = cli(database_url, "retry", "--failed", "--since", "1h", "--operation", "fail")
    assert bulk.returncode == 0, bulk.stderr
    assert int(bulk.stdout.split()[1]) >= 2
    for each in ids:
        assert service.wait_finished(each)["status"] == "completed"

    later = service.submit({"data": {}, "delay_seconds": 3600})
    cancelled = cli(database_url, "cancel", later)
    assert cancelled.returncode == 0 and json.loads(cancelled.stdout)["status"] == "cancelled"


def test_wait_answers_within_50_ms_of_completion(service, conn):
    lags = []
    for _ in range(5):
        task_id = service.submit({"operation": "sleep", "data": {"seconds": 0.3}})
        response = requests.get(f"{service.base_url}/results/{task_id}?wait=10", timeout=15)
        answered = datetime.now(timezone.utc)
        assert response.json()["status"] == "completed"
        completed = conn.execute("SELECT completed_at FROM tasks WHERE task_id = %s", (task_id,)).fetchone()["completed_at"]
        lags.append((answered - completed).total_seconds())
    lags.sort()
    print(f"?wait answer after completion: median {lags[2] * 1000:.1f} ms, max {lags[-1] * 1000:.1f} ms")
    assert lags[2] < 0.05, lags


def test_wait_returns_the_current_state_when_time_runs_out(service):
    task_id = service.submit({"data": {}, "delay_seconds": 3600})
    started = time.monotonic()
    body = requests.get(f"{service.base_url}/results/{task_id}?wait=0.5", timeout=10).json()
    assert body["status"] == "pending"
    assert time.monotonic() - started >= 0.5
    for bad in ("-1", "61", "soon"):
        response = requests.get(f"{service.base_url}/results/{task_id}?wait={bad}", timeout=10)
        assert response.status_code == 422


def test_the_event_stream_shows_progress_until_the_task_finishes(service):
    task_id = service.submit({"operation": "steps", "data": {"count": 3, "seconds": 0.3}})
    documents = []
    with requests.get(f"{service.base_url}/results/{task_id}/events", stream=True, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith(b"data: "):
                documents.append(json.loads(line[len(b"data: "):]))
    assert documents[-1]["status"] == "completed"
    assert documents[-1]["result"] == {"steps": 3}
    progress = [d["progress"] for d in documents if d["status"] == "running" and d["progress"] is not None]
    assert progress == sorted(progress) and len(progress) >= 2, documents
    assert any(d["progress_message"] for d in documents if d["status"] == "running")


def test_the_event_stream_of_an_unknown_task_is_a_json_404(service):
    response = requests.get(f"{service.base_url}/results/00000000-0000-4000-8000-000000000000/events", timeout=10)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "task_not_found"
