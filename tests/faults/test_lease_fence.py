"""The lease's fence: a worker cut off from the database stops its handlers before another worker may take its tasks."""

from __future__ import annotations

import time

import pytest
import requests
from psycopg.conninfo import make_conninfo

from tests.conftest import wait_for
from tests.e2e.fencing_ops import read_journal, runs
from tests.faults.conftest import FAULT_ENV

pytestmark = pytest.mark.faults

STALLED_SECONDS = float(FAULT_ENV["ASYNCPROC_STALLED_SECONDS"])


def test_a_worker_cut_off_from_the_database_stops_its_handler_before_another_takes_the_task(fleet, cluster, proxy, tmp_path):
    journal = tmp_path / "journal.jsonl"
    env = {"ASYNCPROC_OPERATIONS_MODULE": "tests.e2e.fencing_ops", "ASYNCPROC_FENCING_JOURNAL": str(journal)}
    service, _ = fleet.api(**env)
    # Its queries lost on the silent line are broken after 2 s (tests/faults/test_cut_connection.py).
    cut_off = fleet.worker(
        "cut-off", DATABASE_URL=make_conninfo(cluster.url, port=proxy.port), ASYNCPROC_DB_RESPONSE_TIMEOUT="2", **env
    )
    # The first run ignores every request to stop and would outlive the takeover by far.
    task_id = service.submit(
        {"operation": "fence_process", "data": {"seconds": 8 * STALLED_SECONDS, "retry_seconds": 0.2, "honour_stop": False}}
    )
    wait_for(lambda: runs(read_journal(journal), task_id), 20, "the handler to start", interval=0.05)
    other = fleet.worker("other", **env)

    proxy.cut()
    cut_at = time.time()
    body = service.wait_finished(task_id, 60)
    assert (body["status"], body["attempts"]) == ("completed", 2), body

    spans = runs(read_journal(journal), task_id)
    (_, first_end, _), (second_start, _, _) = spans[1], spans[2]
    assert first_end < second_start, f"the runs overlapped: attempt 1 until {first_end}, attempt 2 from {second_start}"
    # Stopped by its own worker's fence, before anyone could take the task over.
    assert first_end < cut_at + STALLED_SECONDS, f"attempt 1 ran {first_end - cut_at:.2f}s past the cut"

    ledger = requests.get(f"{service.base_url}/results/{task_id}/attempts", timeout=10).json()["attempts"]
    assert [(run["attempt"], run["outcome"], run["counted"]) for run in ledger] == [(1, "lost", True), (2, "completed", True)]

    # Once the line heals, the fenced worker takes a new lease and works on, in the same process.
    proxy.heal()
    wait_for(lambda: "registered as worker" in (tmp_path / "cut-off.log").read_text().split("pruned as stalled")[-1],
             30, "the cut-off worker to take a new lease", interval=0.1)
    other.terminate()
    assert other.wait(30) == 0
    after = service.submit({"operation": "fence_process", "data": {"seconds": 0}})
    assert service.wait_finished(after, 30)["status"] == "completed"
    assert cut_off.poll() is None, "the fenced worker must carry on in the same process"
