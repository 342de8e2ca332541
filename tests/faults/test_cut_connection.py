"""A connection cut silently (no FIN, no RST) between the worker and PostgreSQL."""

from __future__ import annotations

import time

import pytest
from psycopg.conninfo import make_conninfo

from tests.conftest import wait_for

pytestmark = pytest.mark.faults

RESPONSE_TIMEOUT = 2


def test_worker_notices_a_half_open_connection_and_carries_on(fleet, cluster, proxy):
    service, _ = fleet.api()
    worker = fleet.worker(
        "worker-1",
        DATABASE_URL=make_conninfo(cluster.url, port=proxy.port),
        ASYNCPROC_DB_RESPONSE_TIMEOUT=str(RESPONSE_TIMEOUT),
    )
    before = service.submit({"operation": "compute"})
    assert service.wait_finished(before, 30)["status"] == "completed"
    running = service.submit({"operation": "sleep", "data": {"seconds": 2}})
    wait_for(lambda: cluster.tasks([running])[running]["status"] == "running", 20, "the sleep task to start")

    proxy.cut()
    cut_at = time.monotonic()
    during = [service.submit({"operation": "compute"}) for _ in range(5)]
    # Silent long enough for the worker's probe (every heartbeat, 1 s) to time
    # out, with its queries lost on the line and new connections tried in vain.
    # Its hung queries would never be answered, even after the line heals.
    wait_for(
        lambda: time.monotonic() - cut_at > 1 + RESPONSE_TIMEOUT and proxy.accepted_while_cut > 0,
        1 + RESPONSE_TIMEOUT + 10,
        "the worker's queries to go unanswered and new connections to be tried",
        interval=0.1,
    )
    assert proxy.dropped_bytes > 0
    proxy.heal()

    for task_id in [running, *during]:
        assert service.wait_finished(task_id, 30)["status"] == "completed"
    after = service.submit({"operation": "compute"})
    assert service.wait_finished(after, 10)["status"] == "completed"
    assert worker.poll() is None, "the worker must carry on in the same process"
