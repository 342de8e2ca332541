"""A thread handler that outlives the grace period: its task is released only after its worker's process has exited."""

from __future__ import annotations

import signal
import time

import pytest
import requests

from tests.conftest import wait_for
from tests.e2e.fencing_ops import read_journal, runs

pytestmark = pytest.mark.faults


def test_a_thread_handler_past_grace_is_released_only_after_its_process_has_exited(fleet, tmp_path):
    journal = tmp_path / "journal.jsonl"
    env = {"ASYNCPROC_OPERATIONS_MODULE": "tests.e2e.fencing_ops", "ASYNCPROC_FENCING_JOURNAL": str(journal)}
    service, _ = fleet.api(**env)
    stopping = fleet.worker("stopping", **env)
    # A thread cannot be killed, and this one ignores every request to stop.
    task_id = service.submit(
        {"operation": "fence_thread", "data": {"seconds": 60, "retry_seconds": 0.2, "honour_stop": False}}
    )
    wait_for(lambda: runs(read_journal(journal), task_id), 20, "the handler to start", interval=0.05)
    fleet.worker("other", **env)

    stopping.send_signal(signal.SIGTERM)
    assert stopping.wait(30) == 0
    # No earlier than the process's exit: the thread (and the attempt) ended with it.
    exited_by = time.time()

    body = service.wait_finished(task_id, 30)
    # The run cut short by the shutdown gave its attempt back.
    assert (body["status"], body["attempts"]) == ("completed", 1), body
    lines = [line for line in read_journal(journal) if line["task_id"] == task_id]
    by_pid: dict[int, list[float]] = {}
    for line in lines:
        by_pid.setdefault(line["pid"], []).append(line["t"])
    (first, second) = sorted(by_pid.values(), key=min)
    assert min(second) > exited_by, (
        f"the re-run started {exited_by - min(second):.2f}s before the stopping worker's process had exited"
        f" (its thread ticked until {exited_by - max(first):.2f}s before that)"
    )

    ledger = requests.get(f"{service.base_url}/results/{task_id}/attempts", timeout=10).json()["attempts"]
    assert [(run["attempt"], run["outcome"], run["counted"]) for run in ledger] == [
        (1, "interrupted", False),
        (1, "completed", True),
    ]
