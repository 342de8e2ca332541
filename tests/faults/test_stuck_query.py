"""A query stuck behind a lock cannot hold an API request: the server cancels it."""

from __future__ import annotations

import time

import pytest

from asyncproc import db

pytestmark = pytest.mark.faults


def test_a_request_stuck_on_a_lock_gets_a_503_after_the_statement_timeout(fleet, cluster):
    service, _ = fleet.api(ASYNCPROC_DB_STATEMENT_TIMEOUT_MS="1000")
    with db.connect(cluster.url) as blocker:
        blocker.autocommit = False
        blocker.execute("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        response = service.post({"operation": "compute"})
        waited = time.monotonic() - started
        blocker.rollback()

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "database_unavailable"
    assert 1 <= waited < 5
    assert service.post({"operation": "compute"}).status_code == 202
