"""Metrics and logs of the real processes: a 2-process gunicorn API and a worker.

The service gets a database of its own, so the ledger's counts are exactly
what these tests sent.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import uuid
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from asyncproc import db, migrate
from asyncproc.config import Settings
from tests.conftest import free_port, wait_for
from tests.e2e.conftest import Service, start_service, stop_service

pytestmark = pytest.mark.e2e

COMPUTES = 40
FAILS = 3
MISSING = 10


class Running:
    def __init__(self, service: Service, worker_metrics_url: str, database_url: str):
        self.service = service
        self.worker_metrics_url = worker_metrics_url
        self.database_url = database_url


@pytest.fixture(scope="module")
def running(tmp_path_factory, empty_database) -> Iterator[Running]:
    database_url = empty_database()
    with db.connect(database_url) as conn:
        migrate.apply_all(conn, Settings().migrations_dir)
    metrics_port = free_port()
    service, processes = start_service(
        tmp_path_factory.mktemp("observability"),
        database_url,
        None,
        concurrency=4,
        extra_env={"ASYNCPROC_LOG_FORMAT": "json", "ASYNCPROC_WORKER_METRICS_PORT": str(metrics_port)},
    )
    yield Running(service, f"http://127.0.0.1:{metrics_port}/metrics", database_url)
    assert stop_service(processes) == [0, 0], f"a process did not exit cleanly; logs in {service.logs}"


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a Prometheus text page, keyed by (name, labels)."""
    response = requests.get(url, timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def json_lines(path: Path) -> list[dict]:
    # Every line must be one JSON object: a collector reads them one by one.
    return [json.loads(line) for line in path.read_text().splitlines()]


def gunicorn_workers(logs: Path) -> list[int]:
    booted = [line["message"] for line in json_lines(logs / "api.log") if line["message"].startswith("Booting worker")]
    return [int(message.rsplit(" ", 1)[1]) for message in booted]


@contextlib.contextmanager
def paused(pid: int) -> Iterator[None]:
    """Stop one gunicorn process so that the other must accept every connection meanwhile."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def api_processes(running: Running) -> list[int]:
    return wait_for(lambda: len(gunicorn_workers(running.service.logs)) == 2 and gunicorn_workers(running.service.logs), 10, "two gunicorn processes")


@pytest.fixture(scope="module")
def traffic(running: Running, api_processes: list[int]) -> dict[str, list[str]]:
    """Requests that each gunicorn process serves a known share of."""
    service = running.service
    first, second = api_processes
    with paused(second):
        computes = [service.submit({"data": {"n": i}}) for i in range(COMPUTES // 2)]
        fails = [service.submit({"operation": "fail", "max_attempts": 1}) for _ in range(FAILS)]
    with paused(first):
        computes += [service.submit({"data": {"n": i}}) for i in range(COMPUTES // 2, COMPUTES)]
        assert [service.get("not-a-task-id").status_code for _ in range(MISSING)] == [404] * MISSING
    for task_id in computes + fails:
        service.wait_finished(task_id)
    return {"compute": computes, "fail": fails}


def test_request_metrics_add_up_across_gunicorn_processes(running, api_processes, traffic):
    first, second = api_processes
    served = Counter(
        line["pid"] for line in json_lines(running.service.logs / "api.log") if line["message"].startswith("queued task")
    )
    assert served == {first: COMPUTES // 2 + FAILS, second: COMPUTES - COMPUTES // 2}
    posted = {"method": "POST", "route": "/process", "status": "202"}
    missing = {"method": "GET", "route": "/results/<raw_id>", "status": "404"}
    # Each process answers a scrape on its own, and each reports the sum over both.
    for answering, other in ((first, second), (second, first)):
        with paused(other):
            samples = scrape(f"{running.service.base_url}/metrics")
        assert sample(samples, "asyncproc_http_requests_total", **posted) == COMPUTES + FAILS, answering
        assert sample(samples, "asyncproc_http_request_duration_seconds_count", **posted) == COMPUTES + FAILS
        assert sample(samples, "asyncproc_http_request_duration_seconds_bucket", **posted, le="+Inf") == COMPUTES + FAILS
        assert sample(samples, "asyncproc_http_requests_total", **missing) == MISSING


def test_task_and_queue_metrics_come_from_the_ledger(running, traffic):
    samples = scrape(f"{running.service.base_url}/metrics")
    assert sample(samples, "asyncproc_database_up") == 1
    assert sample(samples, "asyncproc_tasks_enqueued_total", operation="compute") == COMPUTES
    assert sample(samples, "asyncproc_tasks_completed_total", operation="compute") == COMPUTES
    assert sample(samples, "asyncproc_tasks_failed_total", operation="compute") == 0
    assert sample(samples, "asyncproc_tasks_enqueued_total", operation="fail") == FAILS
    assert sample(samples, "asyncproc_tasks_failed_total", operation="fail") == FAILS
    assert sample(samples, "asyncproc_tasks", operation="fail", status="failed") == FAILS
    assert sample(samples, "asyncproc_queue_depth") == 0
    assert sample(samples, "asyncproc_queue_oldest_age_seconds") == 0
    for histogram in ("asyncproc_ledger_run_seconds", "asyncproc_ledger_queue_wait_seconds"):
        assert sample(samples, f"{histogram}_count", operation="compute") == COMPUTES
        assert sample(samples, f"{histogram}_bucket", operation="compute", le="+Inf") == COMPUTES
        assert sample(samples, f"{histogram}_count", operation="fail") == FAILS

    running.service.submit({"operation": "sleep", "delay_seconds": 3600})
    samples = scrape(f"{running.service.base_url}/metrics")
    assert sample(samples, "asyncproc_queue_scheduled") == 1
    assert sample(samples, "asyncproc_queue_depth") == 0


def test_the_worker_serves_its_own_metrics_on_its_port(running, traffic):
    samples = scrape(running.worker_metrics_url)
    assert sample(samples, "asyncproc_worker_tasks_total", operation="compute", outcome="completed") == COMPUTES
    assert sample(samples, "asyncproc_worker_tasks_total", operation="fail", outcome="failed") == FAILS
    assert sample(samples, "asyncproc_task_queue_wait_seconds_count", operation="compute") == COMPUTES
    assert sample(samples, "asyncproc_task_run_seconds_count", operation="compute", outcome="ok") == COMPUTES
    assert sample(samples, "asyncproc_task_run_seconds_count", operation="fail", outcome="error") == FAILS
    assert sample(samples, "asyncproc_task_run_seconds_bucket", operation="compute", outcome="ok", le="+Inf") == COMPUTES
    assert sample(samples, "asyncproc_worker_tasks_running") == 0


def test_one_request_id_traces_a_task_from_post_through_the_worker_to_its_result(running):
    service = running.service
    request_id = f"trace-{uuid.uuid4().hex}"
    response = service.post({"data": {"n": 5}}, headers={"X-Request-ID": request_id})
    assert response.status_code == 202
    assert response.headers["X-Request-ID"] == request_id
    task_id = response.json()["task_id"]
    assert service.wait_finished(task_id)["status"] == "completed"

    with db.connect(running.database_url) as conn:
        row = conn.execute("SELECT request_id FROM tasks WHERE task_id = %s", (task_id,)).fetchone()
    assert row["request_id"] == request_id

    api_lines = [line for line in json_lines(service.logs / "api.log") if line["request_id"] == request_id]
    assert [line["message"] for line in api_lines] == [f"queued task {task_id} (compute)"]

    def worker_lines() -> list[str]:
        lines = json_lines(service.logs / "worker.log")
        return [line["message"] for line in lines if line["request_id"] == request_id]

    wait_for(lambda: any("completed" in m for m in worker_lines()), 10, "the worker's completion line")
    assert worker_lines() == [
        f"task {task_id} started: compute, attempt 1 of 3",
        f"task {task_id} completed",
    ]
    # Only this task's lines carry the id.
    assert all(task_id in message for message in worker_lines())


def test_a_request_without_an_id_gets_one_and_it_reaches_the_task_row(running):
    response = running.service.post({"data": {"n": 1}})
    generated = response.headers["X-Request-ID"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    with db.connect(running.database_url) as conn:
        row = conn.execute("SELECT request_id FROM tasks WHERE task_id = %s", (response.json()["task_id"],)).fetchone()
    assert row["request_id"] == generated
    # An id the API cannot accept as a header value is replaced, not stored.
    replaced = running.service.post({"data": {"n": 1}}, headers={"X-Request-ID": "has space"})
    assert replaced.headers["X-Request-ID"] != "has space"
