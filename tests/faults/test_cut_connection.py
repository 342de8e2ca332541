"""A connection cut silently (no FIN, no RST) between the worker and PostgreSQL."""

from __future__ import annotations

from typing import Iterator

import pytest
from psycopg.conninfo import make_conninfo

from tests.conftest import wait_for
from tests.faults.proxy import SilentProxy

pytestmark = pytest.mark.faults

RESPONSE_TIMEOUT = 2


@pytest.fixture
def proxy(cluster) -> Iterator[SilentProxy]:
    running = SilentProxy(cluster.server.port).start()
    yield running
    running.stop()


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
    during = [service.submit({"operation": "compute"}) for _ in range(5)]
    # Reconnecting while the line is still silent shows that the worker gave up
    # on its hung connections instead of waiting on them forever.
    wait_for(
        lambda: proxy.accepted_while_cut > 0,
        1 + RESPONSE_TIMEOUT + 10,
        "the worker to drop its hung connections and try new ones",
        interval=0.1,
    )
    assert proxy.dropped_bytes > 0
    proxy.heal()

    for task_id in [running, *during]:
        assert service.wait_finished(task_id, 30)["status"] == "completed"
    after = service.submit({"operation": "compute"})
    assert service.wait_finished(after, 10)["status"] == "completed"
    assert worker.poll() is None, "the worker must carry on in the same process"
