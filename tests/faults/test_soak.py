"""Soak: steady load for a while, a worker killed and replaced, one database outage.

ASYNCPROC_SOAK_SECONDS sets the duration (default 120); only this test reads it.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from asyncproc.config import Settings
from tests.conftest import wait_for
from tests.faults.load import REQUEST_TIMEOUT_SECONDS, Load
from worker.main import stalled_recovery_bound

pytestmark = pytest.mark.faults

SOAK_SECONDS = float(os.environ.get("ASYNCPROC_SOAK_SECONDS", "120"))
OUTAGE_SECONDS = 5
BODIES = [
    {"operation": "compute", "data": {"n": 1000}},
    {"operation": "sleep", "data": {"seconds": 0.5}},
    {"operation": "compute", "data": {"n": 10}},
]


def test_soak_with_a_killed_worker_and_a_database_outage(fleet, cluster):
    service, api = fleet.api()
    worker = fleet.worker("worker-1", concurrency=8)
    started = time.monotonic()
    # Well under what one worker runs on a shared 2-core machine, so that the
    # soak measures losses, not a backlog.
    load = Load(service.base_url, clients=6, bodies=BODIES, pause=0.3).start()

    def soak_until(fraction: float, what: str) -> None:
        # The soak lasts a set time by design; the load must keep being accepted meanwhile.
        moment = started + SOAK_SECONDS * fraction
        accepted = len(load.accepted)
        wait_for(
            lambda: time.monotonic() >= moment and len(load.accepted) > accepted,
            moment - time.monotonic() + 30,
            what,
            interval=0.2,
        )

    soak_until(0.25, "load before the worker is killed")
    worker.send_signal(signal.SIGKILL)
    assert worker.wait(10) == -signal.SIGKILL
    fleet.worker("worker-2", concurrency=8)

    soak_until(0.5, "load before the database outage")
    # The outage starts with the stop: requests fail while the server shuts down, before stop() returns.
    down_at = time.monotonic()
    cluster.stop()
    wait_for(
        lambda: any(a.at > down_at + OUTAGE_SECONDS for a in load.outage_answers()),
        OUTAGE_SECONDS + REQUEST_TIMEOUT_SECONDS,
        "503 answers through the outage",
        interval=0.1,
    )
    cluster.start()
    up_at = time.monotonic()

    soak_until(1.0, "load to the end of the soak")
    load.stop()

    settings = Settings.from_env(fleet.env()).worker
    wait_for(
        lambda: not [row for row in cluster.tasks().values() if row["status"] != "completed"],
        stalled_recovery_bound(settings) + 60,
        "every task to complete",
        interval=0.5,
    )
    rows = cluster.tasks()
    assert len(load.accepted) == len(set(load.accepted)) == len(rows)
    assert set(load.accepted) == set(rows)
    assert {row["status"] for row in rows.values()} == {"completed"}
    assert load.errors() == [], "no 5xx other than the outage's 503s"
    outside = [a for a in load.outage_answers() if not down_at <= a.at <= up_at + 30]
    assert outside == [], (
        "503s only during the outage and the 30 s of recovery after it; these came at (seconds after the"
        f" database was back, outage {up_at - down_at:.1f} s): {[(a.method, round(a.at - up_at, 1)) for a in outside]}"
    )
    assert load.slowest() < REQUEST_TIMEOUT_SECONDS
    assert api.poll() is None
