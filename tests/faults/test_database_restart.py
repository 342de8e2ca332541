"""PostgreSQL restarted under load: 503s while it is away, then recovery with no restart."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.support import children
from tests.faults.load import REQUEST_TIMEOUT_SECONDS, Load

pytestmark = pytest.mark.faults

RECOVERY_SECONDS = 30
# Longer than the fault tests' pool timeout (2 s): every waiter gives up at least once.
OUTAGE_SECONDS = 5
PLAIN_WORKER = Path(__file__).with_name("plain_procrastinate_worker.py")
DEFER_PLAIN_JOB = """
    SELECT unnest(procrastinate_defer_jobs_v1(ARRAY[
        ROW('plain', 'plain.noop', 0, NULL, NULL, '{}'::jsonb, NULL)::procrastinate_job_to_defer_v1
    ])) AS id
"""


def _all_completed(cluster, task_ids: list[str]):
    def probe():
        rows = cluster.tasks(task_ids)
        return len(rows) == len(task_ids) and all(row["status"] == "completed" for row in rows.values())

    return probe


def test_api_and_worker_ride_out_a_database_restart(fleet, cluster):
    service, api = fleet.api()
    worker = fleet.worker("worker-1")
    api_workers = children(api.pid)
    load = Load(service.base_url).start()
    wait_for(lambda: len(load.accepted) >= 20, 30, "the load to get going", interval=0.1)

    cluster.stop()
    down_at = time.monotonic()
    wait_for(
        lambda: any(a.at > down_at + OUTAGE_SECONDS for a in load.outage_answers()),
        OUTAGE_SECONDS + REQUEST_TIMEOUT_SECONDS,
        f"503 answers for {OUTAGE_SECONDS}s while the database is down",
        interval=0.1,
    )
    down = service.post({"operation": "compute"})
    assert down.status_code == 503
    assert down.json()["error"]["code"] == "database_unavailable"
    assert service.health().status_code == 503

    cluster.start()
    back_at = time.monotonic()
    wait_for(
        lambda: any(a.method == "POST" and a.status == 202 and a.at > back_at for a in load.answers),
        RECOVERY_SECONDS,
        "the API to accept tasks again",
        interval=0.1,
    )
    probe = service.submit({"operation": "compute"})
    wait_for(_all_completed(cluster, [probe]), RECOVERY_SECONDS - (time.monotonic() - back_at), "the worker to run tasks again")
    load.stop()

    assert load.errors() == [], "only 2xx and database-down 503s are allowed"
    assert load.slowest() < REQUEST_TIMEOUT_SECONDS
    assert len(load.outage_answers()) >= 10
    wait_for(_all_completed(cluster, load.accepted), RECOVERY_SECONDS, "every accepted task to complete", interval=0.2)
    assert len(cluster.tasks()) == len(load.accepted) + 1
    assert worker.poll() is None and api.poll() is None
    assert children(api.pid) == api_workers, "gunicorn must not have replaced a worker"


def _job_status(cluster, job_id: int) -> str:
    return cluster.query("SELECT status::text FROM procrastinate_jobs WHERE id = %s", (job_id,))[0]["status"]


def test_a_plain_procrastinate_worker_does_not_survive_the_same_outage(cluster, tmp_path):
    """What worker/main.py is for: the same outage ends a plain Procrastinate worker."""
    with open(tmp_path / "plain.log", "wb") as log:
        plain = subprocess.Popen([sys.executable, str(PLAIN_WORKER), cluster.url], stdout=log, stderr=subprocess.STDOUT)
    try:
        first = cluster.query(DEFER_PLAIN_JOB)[0]["id"]
        wait_for(lambda: _job_status(cluster, first) == "succeeded", 30, "the plain worker to run a job")

        cluster.stop()
        wait_for(lambda: plain.poll() is not None, OUTAGE_SECONDS + 10, "the plain worker to give up during the outage")
        cluster.start()
        after = cluster.query(DEFER_PLAIN_JOB)[0]["id"]

        assert plain.returncode != 0
        assert _job_status(cluster, after) == "todo", "nobody is left to run jobs after the restart"
        assert "ConnectorException" in (tmp_path / "plain.log").read_text()
    finally:
        if plain.poll() is None:
            plain.kill()
        plain.wait(10)
