"""Schedules run by a fleet of real worker processes: each occurrence exactly once."""

from __future__ import annotations

from datetime import timedelta
from typing import Iterator

import pytest

from tests.conftest import wait_for
from tests.e2e.conftest import _start, service_env, stop_service

pytestmark = pytest.mark.e2e

WORKERS = 3


@pytest.fixture
def fleet(tmp_path, database_url, clean_db) -> Iterator[None]:
    env = service_env(database_url, None, {"ASYNCPROC_SCHEDULER_POLL_SECONDS": "0.1"})
    workers = [_start(["worker", "--concurrency", "4"], env, tmp_path / f"worker-{i}.log") for i in range(WORKERS)]
    try:
        wait_for(
            lambda: clean_db.execute("SELECT count(*) AS n FROM procrastinate_workers").fetchone()["n"] >= WORKERS,
            30,
            f"{WORKERS} workers to register (logs in {tmp_path})",
            interval=0.1,
        )
        yield
    finally:
        clean_db.execute("DELETE FROM asyncproc_schedules")
        assert stop_service(workers) == [0] * WORKERS, f"a worker did not exit cleanly; logs in {tmp_path}"


def test_each_occurrence_runs_exactly_once_across_the_fleet(fleet, clean_db):
    clean_db.execute(
        "INSERT INTO asyncproc_schedules (name, every_seconds, operation, payload) "
        "VALUES ('every-second', 1, 'compute', '{\"n\": 4}')"
    )

    def completed_runs():
        rows = clean_db.execute(
            "SELECT r.scheduled_for, t.status, t.result FROM asyncproc_schedule_runs r JOIN tasks t USING (task_id) "
            "WHERE r.schedule_name = 'every-second' AND t.status = 'completed' ORDER BY r.scheduled_for"
        ).fetchall()
        return rows if len(rows) >= 4 else None

    runs = wait_for(completed_runs, 20, "four scheduled runs to complete")
    times = [row["scheduled_for"] for row in runs]
    # Whole seconds apart, none twice. (A gap would mean a tick came over a second late.)
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    assert all(gap >= timedelta(seconds=1) and gap.microseconds == 0 for gap in gaps), gaps
    assert {row["result"] for row in runs} == {6}
    tasks = clean_db.execute(
        "SELECT count(*) AS n FROM tasks WHERE request_id = 'schedule:every-second'"
    ).fetchone()["n"]
    runs_rows = clean_db.execute(
        "SELECT count(*) AS n FROM asyncproc_schedule_runs WHERE schedule_name = 'every-second'"
    ).fetchone()["n"]
    assert tasks == runs_rows
