"""Dispatch and recovery against the real worker and API: what an operator's SQL and a broken deploy do to them."""

from __future__ import annotations

import time
from typing import Iterator

import psycopg
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from psycopg.rows import dict_row

from asyncproc import db, migrate
from asyncproc.config import Settings
from tests.conftest import WORKER_OPTIONS, free_port, wait_for
from tests.e2e.conftest import Service, start_service, stop_service

pytestmark = pytest.mark.e2e

STALLED_SECONDS = 3


class Recovery:
    def __init__(self, service: Service, database_url: str, metrics_port: int):
        self.service = service
        self.database_url = database_url
        self.metrics_port = metrics_port

    def sql(self, statement: str, params: tuple = (), **kwargs) -> list[dict]:
        with psycopg.connect(self.database_url, autocommit=True, row_factory=dict_row, **kwargs) as conn:
            cursor = conn.execute(statement, params)
            return cursor.fetchall() if cursor.description else []

    def task(self, task_id: str) -> dict:
        (row,) = self.sql("SELECT status, attempts, error_message, started_at FROM tasks WHERE task_id = %s", (task_id,))
        return row

    def insert(self, operation: str = "compute", payload: str = '{"n": 10}', delay: str = "0 seconds") -> str:
        (row,) = self.sql(
            "INSERT INTO tasks (operation, payload, scheduled_at) VALUES (%s, %s, now() + %s::interval) RETURNING task_id::text",
            (operation, payload, delay),
        )
        return row["task_id"]

    def wait_status(self, task_id: str, status: str, timeout: float) -> dict:
        return wait_for(
            lambda: (row := self.task(task_id))["status"] == status and row,
            timeout,
            f"task {task_id} to be {status} (logs in {self.service.logs})",
            interval=0.05,
        )

    def worker_metric(self, name: str, **labels: str) -> float | None:
        text = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        return None

    def worker_log(self) -> str:
        return (self.service.logs / "worker.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def recovery(tmp_path_factory, empty_database, redis_url) -> Iterator[Recovery]:
    url = empty_database()
    with db.connect(url) as conn:
        migrate.apply_all(conn, Settings().migrations_dir)
    metrics_port = free_port()
    # One slot, so that a sleeping task holds back the queue behind it.
    service, processes = start_service(
        tmp_path_factory.mktemp("recovery"),
        url,
        redis_url,
        concurrency=1,
        extra_env={
            "ASYNCPROC_STALLED_SECONDS": str(STALLED_SECONDS),
            "ASYNCPROC_HEARTBEAT_SECONDS": "1",
            "ASYNCPROC_WORKER_METRICS_PORT": str(metrics_port),
        },
    )
    yield Recovery(service, url, metrics_port)
    assert stop_service(processes) == [0, 0], f"a process did not exit cleanly; logs in {service.logs}"


def test_a_sweep_that_fails_is_logged_reported_and_keeps_going(recovery):
    recovery.sql("ALTER FUNCTION asyncproc_sweep(double precision, integer) RENAME TO asyncproc_sweep_away")
    try:
        wait_for(
            lambda: recovery.worker_metric("asyncproc_worker_loop_failing", loop="sweep") == 1.0,
            30,
            "the worker's metrics to report the sweep failing",
            interval=0.2,
        )
        log = recovery.worker_log()
        assert "sweep failed" in log and "Traceback" in log and "UndefinedFunction" in log
    finally:
        recovery.sql("ALTER FUNCTION asyncproc_sweep_away(double precision, integer) RENAME TO asyncproc_sweep")
    # A running task that lost its job (as a crash leaves it) is found by the same sweep, now healthy again.
    task_id = recovery.insert(delay="1 hour")
    recovery.sql("DELETE FROM procrastinate_jobs WHERE queueing_lock = %s", (task_id,))
    recovery.sql(
        "UPDATE tasks SET status = 'running', attempts = 1, scheduled_at = now() WHERE task_id = %s",
        (task_id,),
        options=WORKER_OPTIONS,
    )
    assert recovery.wait_status(task_id, "completed", 40)["attempts"] == 2
    assert recovery.worker_metric("asyncproc_worker_loop_failing", loop="sweep") == 0.0


def test_a_row_held_in_psql_does_not_stop_the_worker(recovery):
    held = recovery.insert(delay="1 hour")
    with psycopg.connect(recovery.database_url, row_factory=dict_row) as psql:
        psql.execute("SELECT 1 FROM tasks WHERE task_id = %s FOR UPDATE", (held,))
        # Its job falls due while psql holds the row: the worker's next fetch takes it.
        recovery.sql("UPDATE procrastinate_jobs SET scheduled_at = NULL WHERE queueing_lock = %s", (held,))
        other = recovery.service.submit({"operation": "compute", "data": {"n": 5}})
        recovery.wait_status(other, "completed", 10)
        psql.rollback()
    assert recovery.task(held)["status"] == "pending"


def _occupy_the_worker(recovery, seconds: float) -> str:
    blocker = recovery.service.submit({"operation": "sleep", "data": {"seconds": seconds}})
    recovery.wait_status(blocker, "running", 10)
    return blocker


def test_postponing_a_pending_task_in_sql_keeps_it_from_running(recovery):
    blocker = _occupy_the_worker(recovery, 1.5)
    postponed = recovery.service.submit({"operation": "compute", "data": {"n": 5}})
    recovery.sql("UPDATE tasks SET scheduled_at = now() + interval '1 hour' WHERE task_id = %s", (postponed,))
    sentinel = recovery.service.submit({"operation": "compute", "data": {"n": 5}})
    recovery.wait_status(blocker, "completed", 10)
    recovery.wait_status(sentinel, "completed", 10)
    assert recovery.task(postponed)["status"] == "pending"


def test_bringing_a_pending_task_forward_in_sql_runs_it_at_once(recovery):
    task_id = recovery.insert(delay="1 hour")
    recovery.sql("UPDATE tasks SET scheduled_at = now() WHERE task_id = %s", (task_id,))
    moved_at = time.monotonic()
    recovery.wait_status(task_id, "completed", 10)
    # The pickup bound is 200 ms on an idle machine; this bound is loose, for a shared CI box.
    assert time.monotonic() - moved_at < 2.0


def test_raising_a_pending_tasks_priority_in_sql_runs_it_first(recovery):
    blocker = _occupy_the_worker(recovery, 1.0)
    first = recovery.service.submit({"operation": "compute", "data": {"n": 5}})
    urgent = recovery.service.submit({"operation": "compute", "data": {"n": 5}})
    recovery.sql("UPDATE tasks SET priority = 100 WHERE task_id = %s", (urgent,))
    recovery.wait_status(blocker, "completed", 10)
    started = {task_id: recovery.wait_status(task_id, "completed", 10)["started_at"] for task_id in (first, urgent)}
    assert started[urgent] < started[first]


def test_a_malformed_notification_does_not_silence_the_api(recovery):
    recovery.sql("NOTIFY asyncproc_task_changed, 'not-a-uuid pending'")
    recovery.sql("NOTIFY asyncproc_task_changed, '00000000-0000-0000-0000-000000000000 exploded'")
    task_id = recovery.service.submit({"operation": "sleep", "data": {"seconds": 0.5}})
    asked_at = time.monotonic()
    body = requests.get(f"{recovery.service.base_url}/results/{task_id}?wait=15", timeout=20).json()
    assert body["status"] == "completed"
    # Woken by the task's notification, not by the end of the wait.
    assert time.monotonic() - asked_at < 5
    assert recovery.service.health().json()["listener"] == "ok"
    assert "ignored a malformed asyncproc_task_changed notification" in (recovery.service.logs / "api.log").read_text()


@pytest.mark.parametrize(
    "payload",
    ['{"n": ' + "9" * 5000 + "}", '{"n": 1, "deep": ' + "[" * 3000 + "]" * 3000 + "}"],
    ids=["5000-digit number", "nested 3000 deep"],
)
def test_a_poison_row_fails_its_task_and_the_worker_lives(recovery, payload):
    poison = recovery.insert(payload=payload)
    row = recovery.wait_status(poison, "failed", 10)
    assert row["error_message"].startswith("the payload cannot be decoded")
    after = recovery.service.submit({"operation": "compute", "data": {"n": 5}})
    recovery.wait_status(after, "completed", 10)
