"""A worker killed or stopped mid-task loses nothing: the task runs again elsewhere."""

from __future__ import annotations

import signal
import time

import pytest

from asyncproc.config import Settings, WorkerSettings
from tests.conftest import wait_for
from worker.main import stalled_recovery_bound

pytestmark = pytest.mark.faults

# A worker process takes a few seconds to import and connect on a busy machine.
START_SLACK_SECONDS = 10


def test_by_default_a_killed_workers_task_is_requeued_well_within_a_minute():
    assert stalled_recovery_bound(WorkerSettings()) <= 45


def test_the_recovery_bound_follows_the_configured_stalled_limit():
    fast = Settings.from_env({"ASYNCPROC_STALLED_SECONDS": "3", "ASYNCPROC_HEARTBEAT_SECONDS": "1"}).worker
    assert stalled_recovery_bound(fast) == pytest.approx(4)


def _status(cluster, task_id: str, wanted: str):
    def probe():
        row = cluster.tasks([task_id])[task_id]
        return row if row["status"] == wanted else None

    return probe


def _handler_started(fleet, worker: str, task_id: str):
    def probe():
        return f"task {task_id} started:" in (fleet.logs / f"{worker}.log").read_text(errors="replace")

    return probe


def test_a_task_whose_worker_is_killed_completes_once_on_another_worker(fleet, cluster):
    service, _ = fleet.api()
    first = fleet.worker("worker-1")
    task_id = service.submit({"operation": "sleep", "data": {"seconds": 3}})
    wait_for(_status(cluster, task_id, "running"), 30, "the task to start on the first worker")

    first.kill()
    assert first.wait(10) == -signal.SIGKILL
    fleet.worker("worker-2")

    bound = stalled_recovery_bound(Settings.from_env(fleet.env()).worker) + 3 + START_SLACK_SECONDS
    wait_for(_status(cluster, task_id, "completed"), bound, "the task to complete on the second worker", interval=0.2)
    assert cluster.tasks() == {task_id: {"task_id": task_id, "status": "completed", "attempts": 2}}
    body = service.get(task_id).json()
    assert (body["status"], body["attempts"], body["result"]) == ("completed", 2, {"slept": 3.0})


def test_sigterm_lets_running_tasks_finish_and_requeues_those_cut_short_with_their_attempt_back(fleet, cluster):
    grace = 2
    service, _ = fleet.api()
    worker = fleet.worker("worker-1", ASYNCPROC_SHUTDOWN_GRACE_SECONDS=str(grace))
    short = service.submit({"operation": "sleep", "data": {"seconds": 1}})
    long = service.submit({"operation": "sleep", "data": {"seconds": 12}})
    # Its handler, not only its claim: a task claimed by a fetch of several is
    # `running` before the worker starts it, and a stop then returns it unstarted.
    for task_id in (short, long):
        wait_for(_handler_started(fleet, "worker-1", task_id), 30, f"task {task_id}'s handler to start")

    worker.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    late = service.submit({"operation": "sleep", "data": {"seconds": 0}})
    # The process exits at the end of the grace period, not when the abandoned
    # handler thread of the long task would have finished.
    assert worker.wait(grace + 5) == 0
    assert time.monotonic() - stopped_at < grace + 5

    after_exit = cluster.tasks([short, long, late])
    assert after_exit[short]["status"] == "completed"
    assert (after_exit[long]["status"], after_exit[long]["attempts"]) == ("pending", 0)
    assert (after_exit[late]["status"], after_exit[late]["attempts"]) == ("pending", 0)
    assert service.get(long).json()["error_message"] == "interrupted by worker shutdown; attempt not counted"

    fleet.worker("worker-2")
    wait_for(_status(cluster, late, "completed"), START_SLACK_SECONDS, "the late task to run on the next worker")
    wait_for(_status(cluster, long, "completed"), 12 + START_SLACK_SECONDS, "the cut-short task to run again")
    assert cluster.tasks([long])[long]["attempts"] == 1
