"""PostgreSQL restarted under load: 503s while it is away, then recovery with no restart."""

from __future__ import annotations

import time

import pytest

from tests.conftest import wait_for
from tests.faults.conftest import children
from tests.faults.load import REQUEST_TIMEOUT_SECONDS, Load

pytestmark = pytest.mark.faults

RECOVERY_SECONDS = 30


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
    wait_for(lambda: len(load.outage_answers()) >= 10, 20, "503 answers while the database is down", interval=0.1)
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
