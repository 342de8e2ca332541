"""Batched completion on real workers: an outcome is recorded once, by the attempt that is still current, and a
worker killed mid-batch loses none (worker/completer.py, migrations/0014)."""

from __future__ import annotations

import signal

import pytest

from asyncproc.config import Settings
from tests.conftest import wait_for
from worker.main import stalled_recovery_bound

pytestmark = pytest.mark.faults

START_SLACK_SECONDS = 10
FINAL = ("completed", "failed", "cancelled")


def _queue(cluster, count: int, seconds: float) -> list[str]:
    rows = cluster.query(
        "INSERT INTO tasks (operation, payload) SELECT 'sleep', jsonb_build_object('seconds', %s::float8)"
        " FROM generate_series(1, %s) RETURNING task_id::text AS task_id",
        (seconds, count),
    )
    return [row["task_id"] for row in rows]


def _count(cluster, status: str) -> int:
    return cluster.query("SELECT count(*) AS n FROM tasks WHERE status = %s", (status,))[0]["n"]


def test_a_worker_killed_while_completing_loses_no_outcome(fleet, cluster):
    task_ids = _queue(cluster, 400, 0.005)
    first = fleet.worker("worker-1", concurrency=20)
    wait_for(lambda: _count(cluster, "completed") >= 40, 60, "the first worker to complete some tasks", interval=0.02)
    first.kill()
    assert first.wait(10) == -signal.SIGKILL
    recorded_before = {
        row["task_id"]: row for row in cluster.query(
            "SELECT task_id::text AS task_id, attempts, result FROM tasks WHERE status = 'completed'")
    }
    assert 0 < len(recorded_before) < len(task_ids)

    fleet.worker("worker-2", concurrency=20)
    bound = stalled_recovery_bound(Settings.from_env(fleet.env()).worker) + START_SLACK_SECONDS + 30
    wait_for(lambda: _count(cluster, "completed") == len(task_ids), bound, "every task to complete", interval=0.2)
    final = {
        row["task_id"]: row for row in cluster.query("SELECT task_id::text AS task_id, attempts, result FROM tasks")
    }
    assert all(row["result"] == {"slept": 0.005} for row in final.values())
    # What was committed before the kill stays as it was: recorded once, never run again.
    assert all(final[task_id] == row for task_id, row in recorded_before.items())


def test_a_cancelled_attempt_that_finishes_records_nothing(fleet, cluster):
    fleet.worker("worker-1", concurrency=30)
    task_ids = _queue(cluster, 60, 0.3)
    wait_for(lambda: _count(cluster, "running") >= 20, 60, "tasks to be running", interval=0.02)
    cancelled = [
        row["task_id"] for row in cluster.query(
            "SELECT t.task_id::text AS task_id FROM tasks t, asyncproc_cancel(t.task_id) c WHERE t.status = 'running'")
    ]
    assert cancelled

    def all_final() -> bool:
        return cluster.query(
            "SELECT count(*) AS n FROM tasks WHERE status = ANY(%s)", (list(FINAL),))[0]["n"] == len(task_ids)

    wait_for(all_final, 60, "every task to end", interval=0.1)
    rows = {
        row["task_id"]: row for row in cluster.query(
            "SELECT task_id::text AS task_id, status, result FROM tasks")
    }
    for task_id in cancelled:
        assert (rows[task_id]["status"], rows[task_id]["result"]) == ("cancelled", None), task_id
    for task_id in set(task_ids) - set(cancelled):
        assert (rows[task_id]["status"], rows[task_id]["result"]) == ("completed", {"slept": 0.3}), task_id
