"""Access control and the shared rate limit, through the real gunicorn with 2 worker processes."""

from __future__ import annotations

import re
import time
from typing import Iterator

import pytest
import requests

from asyncproc import keys
from tests.conftest import wait_for
from tests.e2e.conftest import Service, start_service, stop_service
from tests.support import bearer, new_key

RATE = 0.2
BURST = 10
LIMITED_LINE = re.compile(r"\[(\d+)\] asyncproc\.api \[rid=\S+\] 429 rate_limited")


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, database_url) -> Iterator[Service]:
    running, processes = start_service(
        tmp_path_factory.mktemp("guarded"),
        database_url,
        None,
        extra_env={
            "ASYNCPROC_AUTH": "required",
            "ASYNCPROC_RATE_LIMIT_PER_SECOND": str(RATE),
            "ASYNCPROC_RATE_LIMIT_BURST": str(BURST),
        },
    )
    yield running
    assert stop_service(processes) == [0, 0], f"a process did not exit cleanly; logs in {running.logs}"


def test_keys_guard_the_api_and_hide_other_keys_tasks(guarded, conn):
    assert guarded.health().status_code == 200
    refused = guarded.post({"data": {"n": 3}})
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"] == 'Bearer realm="asyncproc"'
    assert refused.json()["error"]["code"] == "unauthorized"
    alice, bob = new_key(conn), new_key(conn)
    created = guarded.post({"data": {"n": 3}}, headers=bearer(alice))
    assert created.status_code == 202
    task_id = created.json()["task_id"]

    def completed() -> bool:
        # Polled in PostgreSQL: polling over HTTP would spend the rate limit.
        row = conn.execute("SELECT status FROM tasks WHERE task_id = %s", (task_id,)).fetchone()
        return row["status"] == "completed"

    wait_for(completed, 20, "alice's task to complete")
    mine = requests.get(f"{guarded.base_url}/results/{task_id}", headers=bearer(alice), timeout=10)
    assert mine.status_code == 200 and mine.json()["result"] == 3
    hidden = requests.get(f"{guarded.base_url}/results/{task_id}", headers=bearer(bob), timeout=10)
    assert hidden.status_code == 404


def test_one_rate_limit_holds_across_both_gunicorn_processes(guarded, conn):
    key = new_key(conn)
    statuses: list[int] = []
    start = time.monotonic()

    def limited_by_both_processes() -> bool:
        # New connections each time, so both processes take requests; keep
        # going until each of them has refused at least one.
        for response in [guarded.post({"data": {"n": 1}}, headers=bearer(key)) for _ in range(5)]:
            statuses.append(response.status_code)
            if response.status_code == 429:
                assert int(response.headers["Retry-After"]) >= 1
                assert response.json()["error"]["code"] == "rate_limited"
        log = (guarded.logs / "api.log").read_text()
        return len(set(LIMITED_LINE.findall(log))) >= 2

    wait_for(limited_by_both_processes, 15, f"both API processes to rate-limit (logs in {guarded.logs})")
    elapsed = time.monotonic() - start
    assert set(statuses) == {202, 429}
    # One shared bucket: the burst plus what refilled, whichever process
    # answered. Separate buckets per process would have let about 2 x BURST in.
    assert BURST <= statuses.count(202) <= BURST + int(RATE * elapsed) + 1
    owned = conn.execute("SELECT count(*) AS n FROM tasks WHERE owner = %s", (keys.verify(conn, key).id,)).fetchone()["n"]
    assert owned == statuses.count(202)
