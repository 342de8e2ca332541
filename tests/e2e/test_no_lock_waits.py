"""Admission and dispatch never wait on a lock inside a fetch, and a skipped lock never drops a change.

A fleet of two real worker processes (concurrency 4 each) over the session's
PostgreSQL; tasks are written with SQL, as an operator would. Each handler is
tests/e2e/fencing_ops.py's journal_run.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

import psycopg
import pytest

from asyncproc import db
from tests.conftest import wait_for
from tests.e2e.conftest import _start, service_env, stop_processes
from tests.e2e.fencing_ops import JOURNAL_ENV

pytestmark = pytest.mark.e2e

WORKERS = 2
CONCURRENCY = 4
STALLED_SECONDS = 3  # a sweep every second (worker/main.py: sweep_period)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, database_url) -> Iterator[Path]:
    logs = tmp_path_factory.mktemp("no-lock-waits")
    env = service_env(database_url, None, {
        "ASYNCPROC_OPERATIONS_MODULE": "tests.e2e.fencing_ops",
        "ASYNCPROC_STALLED_SECONDS": str(STALLED_SECONDS),
        "ASYNCPROC_HEARTBEAT_SECONDS": "1",
        JOURNAL_ENV: str(logs / "journal.jsonl"),
    })
    with db.connect(database_url) as conn:
        conn.execute("DELETE FROM asyncproc_operation_settings")
        known = {row["id"] for row in conn.execute("SELECT id FROM procrastinate_workers")}
    processes = [
        _start(["worker", "--concurrency", str(CONCURRENCY)], env, logs / f"worker-{n}.log") for n in range(WORKERS)
    ]
    try:
        with db.connect(database_url) as conn:
            wait_for(
                lambda: len({row["id"] for row in conn.execute("SELECT id FROM procrastinate_workers")} - known)
                >= WORKERS,
                30, f"{WORKERS} workers to register (logs in {logs})", interval=0.1,
            )
        yield logs
    finally:
        stop_processes(processes)
    assert [process.returncode for process in processes] == [0] * WORKERS, (
        f"a worker did not exit cleanly; logs in {logs}"
    )


@pytest.fixture
def settings_rows(fleet, clean_db) -> Iterator[psycopg.Connection]:
    """The fleet with no tasks, no jobs and no per-operation settings; settings are removed again afterwards."""
    clean_db.execute("DELETE FROM asyncproc_operation_settings")
    yield clean_db
    clean_db.execute("DELETE FROM asyncproc_operation_settings")


def _deadlocks(conn) -> int:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return conn.execute("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()").fetchone()["deadlocks"]


def _tasks(conn, task_ids: list[str]) -> list[dict]:
    return conn.execute(
        "SELECT task_id::text, operation, status, attempts, error_message FROM tasks WHERE task_id = ANY(%s::uuid[])",
        (task_ids,),
    ).fetchall()


def _all_completed(conn, task_ids: list[str]) -> bool:
    rows = _tasks(conn, task_ids)
    return len(rows) == len(task_ids) and all(row["status"] == "completed" for row in rows)


def _summary(conn, task_ids: list[str]) -> dict:
    counts: dict[tuple, int] = {}
    for row in _tasks(conn, task_ids):
        key = (row["operation"], row["status"], row["attempts"])
        counts[key] = counts.get(key, 0) + 1
    return counts


def _deadlock_lines(logs: Path) -> list[str]:
    return [
        line for log in sorted(logs.glob("worker-*.log"))
        for line in log.read_text(errors="replace").splitlines() if "deadlock detected" in line
    ]


def _worker_lock_waits(conn) -> int:
    return conn.execute(
        "SELECT count(*) AS waiting FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name LIKE 'asyncproc-worker%%' AND wait_event_type = 'Lock'"
    ).fetchone()["waiting"]


def _started(conn, task_ids: list[str], operation: str) -> int:
    return conn.execute(
        "SELECT count(*) AS started FROM tasks WHERE task_id = ANY(%s::uuid[]) AND operation = %s AND status <> 'pending'",
        (task_ids, operation),
    ).fetchone()["started"]


def test_limits_on_two_operations_never_deadlock_the_fetch(fleet, settings_rows, database_url):
    """Defect 1: a fetch locked the settings row of each limited operation it claimed, in the order of the jobs it
    took, until its commit; two fetches that claimed fence_a then fence_b, and fence_b then fence_a, deadlocked.

    The interleaving is made certain, not hoped for: an operator's open edit of fence_b's row lines the two
    workers' fetches up (one holds the first fence_b job and waits for the row; the other claims a fence_a task,
    then waits for the row too); the ROLLBACK lets them go. Where admission never waits, neither fetch stops.
    """
    conn = settings_rows
    conn.execute(
        "INSERT INTO asyncproc_operation_settings (operation, max_running, rate_per_second, burst)"
        " VALUES ('fence_a', 3, NULL, NULL), ('fence_b', 3, 200, 8)"
    )
    deadlocks_before = _deadlocks(conn)
    log_lines_before = len(_deadlock_lines(fleet))
    with psycopg.connect(database_url) as holder:
        holder.execute("UPDATE asyncproc_operation_settings SET max_running = 4 WHERE operation = 'fence_b'")
        # Alternating operations, fence_b first: every fetch of several jobs claims both.
        task_ids = [row["task_id"] for row in conn.execute(
            "INSERT INTO tasks (operation, payload)"
            " SELECT CASE WHEN i % 2 = 1 THEN 'fence_b' ELSE 'fence_a' END, '{\"seconds\": 0.01}'"
            " FROM generate_series(1, 160) AS i RETURNING task_id::text"
        )]
        wait_for(
            lambda: _worker_lock_waits(conn) >= WORKERS or _started(conn, task_ids, "fence_a") >= 2, 10,
            "both workers' fetches to wait for fence_b's row, or fence_a's tasks to start without waiting",
        )
        holder.rollback()
    try:
        wait_for(lambda: _all_completed(conn, task_ids), 30, "every task to complete", interval=0.1)
    except TimeoutError:
        pytest.fail(
            f"not every task completed within 30 s: (operation, status, attempts) -> count {_summary(conn, task_ids)};"
            f" deadlocks in the database since the start: {_deadlocks(conn) - deadlocks_before};"
            f" 'deadlock detected' in the worker logs: {len(_deadlock_lines(fleet)) - log_lines_before} (logs in {fleet})"
        )
    new_lines = _deadlock_lines(fleet)[log_lines_before:]
    rise = _deadlocks(conn) - deadlocks_before
    assert (rise, len(new_lines)) == (0, 0), (
        f"the fetches deadlocked: pg_stat_database.deadlocks rose by {rise}, the worker logs (in {fleet}) say"
        f" 'deadlock detected' {len(new_lines)} time(s): {new_lines[:1]}"
    )
    assert _summary(conn, task_ids) == {("fence_a", "completed", 1): 80, ("fence_b", "completed", 1): 80}


@pytest.mark.parametrize("other_has_row", [False, True], ids=["other operation unlimited", "other operation limited"])
def test_an_uncommitted_settings_edit_holds_back_only_its_own_operation(fleet, settings_rows, database_url, other_has_row):
    """Defect 2: a claim waited for the settings row of its task's operation, and a fetch waits for all of its
    claims: while psql held fence_x's row in an open transaction, every worker's fetch stalled on a fence_x job,
    and fence_y's tasks waited until the ROLLBACK."""
    conn = settings_rows
    conn.execute("INSERT INTO asyncproc_operation_settings (operation, max_running) VALUES ('fence_x', 10)")
    if other_has_row:
        conn.execute("INSERT INTO asyncproc_operation_settings (operation, max_running) VALUES ('fence_y', 10)")
    with psycopg.connect(database_url) as holder:
        # An operator's edit, not yet committed.
        holder.execute("UPDATE asyncproc_operation_settings SET max_running = 5 WHERE operation = 'fence_x'")
        # fence_x first in the queue (a higher priority), more of them than there are workers.
        rows = conn.execute(
            "INSERT INTO tasks (operation, payload, priority)"
            " SELECT CASE WHEN i <= 3 THEN 'fence_x' ELSE 'fence_y' END, '{\"seconds\": 0.05}',"
            "        CASE WHEN i <= 3 THEN 10 ELSE 0 END"
            " FROM generate_series(1, 9) AS i RETURNING task_id::text, operation"
        ).fetchall()
        x_ids = [row["task_id"] for row in rows if row["operation"] == "fence_x"]
        y_ids = [row["task_id"] for row in rows if row["operation"] == "fence_y"]
        try:
            wait_for(lambda: _all_completed(conn, y_ids), 5, "fence_y's tasks", interval=0.05)
        except TimeoutError:
            pytest.fail(
                "fence_y's tasks did not complete within 5 s while fence_x's settings row was held:"
                f" {_summary(conn, x_ids + y_ids)} (logs in {fleet})"
            )
        # Still held: fence_x's limits cannot be read, so none of its tasks may start.
        assert {row["status"] for row in _tasks(conn, x_ids)} == {"pending"}, _summary(conn, x_ids)
        holder.rollback()
    try:
        wait_for(lambda: _all_completed(conn, x_ids), 10, "fence_x's tasks after the ROLLBACK", interval=0.05)
    except TimeoutError:
        pytest.fail(f"fence_x's tasks did not complete within 10 s of the ROLLBACK: {_summary(conn, x_ids)}")
    assert _summary(conn, x_ids + y_ids) == {("fence_x", "completed", 1): 3, ("fence_y", "completed", 1): 6}


OLDER_TASKS = 1200  # more than the sweep's window (asyncproc_sweep's window_size, 1,000)


def _queued_job_priorities(conn, task_id: str) -> list[int]:
    return [row["priority"] for row in conn.execute(
        "SELECT priority FROM procrastinate_jobs WHERE queueing_lock = %s AND status = 'todo'", (task_id,)
    )]


def test_a_priority_edit_made_while_a_fetch_holds_the_job_takes_effect(fleet, settings_rows, database_url):
    """Defect 4: the dispatch trigger skips a job that another transaction holds (a fetch) and left the job with
    the old priority, for the sweep to repair; the sweep looks at the 1,000 oldest pending tasks of an operation
    only, so behind a longer backlog the edit was lost for good."""
    conn = settings_rows
    # Pending and not yet due, so that no worker runs them; all older than the edited task.
    conn.execute(
        "INSERT INTO tasks (operation, payload, scheduled_at)"
        " SELECT 'fence_parked', '{}', now() + interval '1 hour' FROM generate_series(1, %s)", (OLDER_TASKS,)
    )
    task_id = conn.execute(
        "INSERT INTO tasks (operation, payload, scheduled_at) VALUES ('fence_parked', '{}', now() + interval '1 hour')"
        " RETURNING task_id::text"
    ).fetchone()["task_id"]
    assert _queued_job_priorities(conn, task_id) == [0]

    edit_errors: list[BaseException] = []
    with psycopg.connect(database_url) as holder, db.connect(database_url) as editor:
        editor_pid = editor.info.backend_pid
        # What a fetch does to the jobs it looks at.
        holder.execute(
            "SELECT id FROM procrastinate_jobs WHERE queueing_lock = %s AND status = 'todo' FOR UPDATE", (task_id,)
        )

        def edit() -> None:
            try:
                editor.execute("UPDATE tasks SET priority = 7 WHERE task_id = %s", (task_id,))
            except psycopg.Error as exc:
                edit_errors.append(exc)

        editing = threading.Thread(target=edit, name="priority-edit")
        editing.start()

        def edit_done_or_waiting() -> bool:
            if not editing.is_alive():
                return True
            row = conn.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (editor_pid,)).fetchone()
            return row is not None and row["wait_event_type"] == "Lock"

        # The edit either skips the held job or waits for it; either way the fetch then lets go.
        wait_for(edit_done_or_waiting, 10, "the priority edit to finish or to wait for the held job")
        holder.rollback()
        editing.join(10)
        assert not editing.is_alive(), "the priority edit never finished"
    assert not edit_errors, edit_errors
    assert conn.execute("SELECT priority FROM tasks WHERE task_id = %s", (task_id,)).fetchone()["priority"] == 7
    try:
        wait_for(lambda: _queued_job_priorities(conn, task_id) == [7], 10, "the queued job to carry priority 7",
                 interval=0.1)
    except TimeoutError:
        pytest.fail(
            f"10 s after the edit the task's queued job(s) still carry priority {_queued_job_priorities(conn, task_id)},"
            " the task 7: the edit made while the job was held was dropped"
        )
