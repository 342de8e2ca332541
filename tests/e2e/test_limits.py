"""Per-operation limits across a fleet of two worker processes."""

from __future__ import annotations

from typing import Iterator

import pytest

from asyncproc import cli
from tests.conftest import wait_for
from tests.e2e.conftest import Service, _start, service_env, start_service, stop_service

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, database_url) -> Iterator[Service]:
    logs = tmp_path_factory.mktemp("limits")
    running, processes = start_service(logs, database_url, None, concurrency=4)
    processes.append(_start(["worker", "--concurrency", "4"], service_env(database_url, None), logs / "worker-2.log"))
    yield running
    assert stop_service(processes) == [0, 0, 0], f"a process did not exit cleanly; logs in {running.logs}"


@pytest.fixture
def limits(fleet, clean_db, database_url, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", database_url)

    def run(*args: str) -> None:
        assert cli.main(["limits", *args]) == 0

    yield run
    clean_db.execute("DELETE FROM asyncproc_operation_settings")


def insert(conn, operation: str, payload: str, count: int) -> list[str]:
    rows = conn.execute(
        "INSERT INTO tasks (operation, payload) SELECT %s, %s::jsonb FROM generate_series(1, %s) RETURNING task_id::text",
        (operation, payload, count),
    ).fetchall()
    return [row["task_id"] for row in rows]


def all_completed(conn, task_ids: list[str]) -> bool:
    row = conn.execute(
        "SELECT count(*) FILTER (WHERE status = 'completed') AS done FROM tasks WHERE task_id = ANY(%s::uuid[])",
        (task_ids,),
    ).fetchone()
    return row["done"] == len(task_ids)


def test_max_running_holds_across_the_fleet_and_held_tasks_say_why(fleet, limits, clean_db):
    limits("set", "sleep", "--max-running", "2")
    task_ids = insert(clean_db, "sleep", '{"seconds": 0.3}', 8)
    most_running, reasons = 0, set()

    def sampled_until_done() -> bool:
        nonlocal most_running
        row = clean_db.execute(
            "SELECT count(*) FILTER (WHERE status = 'running') AS running, "
            "array_agg(DISTINCT wait_reason) FILTER (WHERE wait_reason IS NOT NULL) AS reasons "
            "FROM tasks WHERE task_id = ANY(%s::uuid[])",
            (task_ids,),
        ).fetchone()
        most_running = max(most_running, row["running"])
        reasons.update(row["reasons"] or [])
        return all_completed(clean_db, task_ids)

    wait_for(sampled_until_done, 30, f"the sleep tasks to complete (logs in {fleet.logs})", interval=0.01)
    assert most_running == 2
    assert any(reason.startswith("max_running") for reason in reasons), reasons


def test_a_held_task_starts_within_200_ms_of_capacity_freeing(fleet, limits, clean_db):
    limits("set", "sleep", "--max-running", "1")
    task_ids = insert(clean_db, "sleep", '{"seconds": 0.3}', 3)
    wait_for(lambda: all_completed(clean_db, task_ids), 30, f"the sleep tasks to complete (logs in {fleet.logs})")
    runs = clean_db.execute(
        "SELECT started_at, completed_at FROM tasks WHERE task_id = ANY(%s::uuid[]) ORDER BY started_at", (task_ids,)
    ).fetchall()
    gaps = [(later["started_at"] - earlier["completed_at"]).total_seconds() for earlier, later in zip(runs, runs[1:])]
    assert all(0 <= gap < 0.2 for gap in gaps), gaps


def test_a_paused_operation_keeps_its_tasks_pending_until_resumed(fleet, limits, clean_db):
    limits("pause", "shout")
    (task_id,) = insert(clean_db, "shout", '{"text": "later"}', 1)

    def held():
        document = fleet.get(task_id).json()
        return document if document["wait_reason"] else None

    document = wait_for(held, 5, "the task to be held")
    assert document["status"] == "pending" and document["wait_reason"].startswith("paused")
    limits("resume", "shout")
    done = fleet.wait_finished(task_id, timeout=10)
    assert done["status"] == "completed" and done["wait_reason"] is None


def test_the_rate_holds_across_the_fleet(fleet, limits, clean_db):
    limits("set", "async_echo", "--rate", "5", "--burst", "1", "--force")
    task_ids = insert(clean_db, "async_echo", "{}", 6)
    wait_for(lambda: all_completed(clean_db, task_ids), 30, f"the tasks to complete (logs in {fleet.logs})")
    starts = [
        row["started_at"]
        for row in clean_db.execute(
            "SELECT started_at FROM tasks WHERE task_id = ANY(%s::uuid[]) ORDER BY started_at", (task_ids,)
        )
    ]
    # One token at once, five a second: six starts span at least a second.
    assert (starts[-1] - starts[0]).total_seconds() >= 0.95, starts


@pytest.fixture
def unchecked_limits(limits, clean_db):
    """The settings table without its CHECK on the limits, as in a database whose rows predate it."""
    check = clean_db.execute(
        "SELECT conname, pg_get_constraintdef(oid) AS definition FROM pg_constraint WHERE conname = 'asyncproc_operation_settings_limits'"
    ).fetchone()
    if check:
        clean_db.execute(f"ALTER TABLE asyncproc_operation_settings DROP CONSTRAINT {check['conname']}")
    yield clean_db
    clean_db.execute("DELETE FROM asyncproc_operation_settings")
    if check:
        clean_db.execute(f"ALTER TABLE asyncproc_operation_settings ADD CONSTRAINT {check['conname']} {check['definition']}")


@pytest.mark.parametrize("rate", ["1e-300", "1e308", "NaN", "Infinity"])
def test_a_bad_stored_rate_holds_back_its_own_operation_only(fleet, unchecked_limits, rate):
    """1e-300 overflowed the park and 1e308 the token bucket, failing every fetch that met such a task; NaN and
    Infinity meant no limit. The bucket was last filled an hour ago, so that 1e308 overflows at the first claim."""
    conn = unchecked_limits
    conn.execute(
        "INSERT INTO asyncproc_operation_settings (operation, rate_per_second, tokens, tokens_at)"
        " VALUES ('async_echo', %s::double precision, 0, now() - interval '1 hour')",
        (rate,),
    )
    # Queued first, so that a fetch meets them before the other operation's.
    held = insert(conn, "async_echo", "{}", 3)
    others = insert(conn, "shout", '{"text": "on"}', 3)
    wait_for(lambda: all_completed(conn, others), 15, f"the other operation's tasks to complete (logs in {fleet.logs})")

    def held_for_the_row() -> bool:
        # "busy" first, for a task whose fetch met the row while another fetch had it: tried again a second later.
        rows = conn.execute("SELECT status, wait_reason FROM tasks WHERE task_id = ANY(%s::uuid[])", (held,)).fetchall()
        return all(
            row["status"] == "pending" and (row["wait_reason"] or "").startswith("invalid limits: rate_per_second must be from")
            for row in rows
        )

    wait_for(held_for_the_row, 10, "the bad row's tasks to be held, and say why")
    # Setting the row right lets them go at once.
    conn.execute("UPDATE asyncproc_operation_settings SET rate_per_second = NULL WHERE operation = 'async_echo'")
    wait_for(lambda: all_completed(conn, held), 15, f"the held tasks to complete (logs in {fleet.logs})")
