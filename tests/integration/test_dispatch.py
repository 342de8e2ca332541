"""The seam between tasks and procrastinate_jobs, tried as the worker, an operator and a hostile role would.

Each test drives the real SQL the worker runs (its fetch, our
claim, outcome and sweep functions) from connections of its own, in the
interleavings that used to deadlock, loop or lose tasks.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from tests.conftest import wait_for
from tests.support import connect, fetch, insert_task, jobs_for, register_worker, task_row


def sweep(conn, stalled_seconds: float = 30) -> dict:
    return conn.execute(
        "SELECT requeued, failed, redeferred, dropped FROM asyncproc_sweep(%s)", (stalled_seconds,)
    ).fetchone()


def todo_jobs(conn) -> list[dict]:
    return conn.execute(
        "SELECT args->>'task_id' AS task_id, priority, scheduled_at FROM procrastinate_jobs WHERE status = 'todo' ORDER BY id"
    ).fetchall()


class Background:
    """Runs a call in a thread and keeps its result or its exception for the test to assert on."""

    def __init__(self, call: Callable[[], Any]):
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self.result = call()
        except BaseException as exc:  # handed to the test, which asserts on it
            self.error = exc

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


def waiting_on_a_lock(conn, application_name: str) -> bool:
    return conn.execute(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'",
        (application_name,),
    ).fetchone()["n"] > 0


# 1. One lock order: a cancel and a fetch of the same task never deadlock.


def test_a_cancel_racing_a_fetch_of_the_same_task_neither_deadlocks_nor_waits(clean_db, database_url):
    task_id = insert_task(clean_db)
    worker_id = register_worker(clean_db)
    with connect(database_url, application_name="test-operator") as operator, connect(
        database_url, application_name="test-fetcher"
    ) as fetcher:
        operator.autocommit = False
        # The operator's transaction holds the task, as a bulk UPDATE holds the rows it has passed.
        operator.execute("SELECT 1 FROM tasks WHERE task_id = %s FOR UPDATE", (task_id,))
        fetching = Background(lambda: fetch(fetcher, worker_id))
        finished = fetching.join(5)
        blocked = not finished and waiting_on_a_lock(clean_db, "test-fetcher")
        operator.execute("UPDATE tasks SET status = 'cancelled' WHERE task_id = %s", (task_id,))
        operator.commit()
        assert fetching.join(10)
    assert not blocked, "the fetch waited for the operator's row lock"
    assert fetching.error is None, fetching.error
    assert fetching.result["args"]["claimed"] is None
    assert task_row(clean_db, task_id)["status"] == "cancelled"
    assert todo_jobs(clean_db) == []


def test_a_bulk_cancel_concurrent_with_fetching_never_deadlocks(clean_db, database_url):
    clean_db.execute("INSERT INTO tasks (operation) SELECT 'compute' FROM generate_series(1, 2000)")
    deadlocks_before = clean_db.execute(
        "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
    ).fetchone()["deadlocks"]
    worker_id = register_worker(clean_db)
    stop = threading.Event()

    def fetch_until_stopped() -> int:
        fetched = 0
        with connect(database_url) as fetcher:
            while not stop.is_set() and fetch(fetcher, worker_id) is not None:
                fetched += 1
        return fetched

    fetchers = [Background(fetch_until_stopped) for _ in range(3)]
    with connect(database_url) as operator:
        cancelled = operator.execute("UPDATE tasks SET status = 'cancelled' WHERE status = 'pending'").rowcount
    stop.set()
    for fetcher in fetchers:
        assert fetcher.join(30)
        assert fetcher.error is None, fetcher.error
    assert cancelled > 0
    deadlocks_after = clean_db.execute(
        "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
    ).fetchone()["deadlocks"]
    assert deadlocks_after == deadlocks_before
    # Every task is either cancelled or was claimed before the cancel reached it.
    statuses = {row["status"] for row in clean_db.execute("SELECT DISTINCT status FROM tasks")}
    assert statuses <= {"cancelled", "running"}


# 2. Attempts bound every way a run can end.


def _claimed_by_a_dead_worker(conn, database_url, max_attempts: int) -> str:
    task_id = conn.execute(
        "INSERT INTO tasks (operation, max_attempts) VALUES ('compute', %s) RETURNING task_id", (max_attempts,)
    ).fetchone()["task_id"]
    worker_id = register_worker(conn)
    with connect(database_url) as fetcher:
        assert fetch(fetcher, worker_id)["args"]["claimed"]["attempts"] == 1
    conn.execute("SELECT procrastinate_unregister_worker_v1(%s)", (worker_id,))
    return task_id


def test_a_task_whose_worker_died_on_its_last_attempt_fails_instead_of_looping(clean_db, database_url):
    task_id = _claimed_by_a_dead_worker(clean_db, database_url, max_attempts=1)
    assert sweep(clean_db)["failed"] == 1
    row = task_row(clean_db, task_id)
    assert row["status"] == "failed" and row["attempts"] == 1
    assert "worker lost during attempt 1 of 1" in row["error_message"]
    assert "no attempt left" in row["error_message"]
    assert jobs_for(clean_db, task_id) == []


def test_a_task_that_keeps_killing_its_worker_runs_max_attempts_times(clean_db, database_url):
    task_id = clean_db.execute("INSERT INTO tasks (operation, max_attempts) VALUES ('compute', 3) RETURNING task_id").fetchone()["task_id"]
    runs = 0
    with connect(database_url) as fetcher:
        for _ in range(10):
            worker_id = register_worker(clean_db)
            job = fetch(fetcher, worker_id)
            if job is None:
                break
            if job["args"]["claimed"] is not None:
                runs += 1
            clean_db.execute("SELECT procrastinate_unregister_worker_v1(%s)", (worker_id,))
            sweep(clean_db)
            # Backoff is the worker's business; make the re-queued task due again at once.
            clean_db.execute("UPDATE tasks SET scheduled_at = now() WHERE task_id = %s AND status = 'pending'", (task_id,))
    row = task_row(clean_db, task_id)
    assert runs == 3
    assert row["status"] == "failed" and row["attempts"] == 3


def test_the_claim_never_runs_a_task_past_its_max_attempts(clean_db, worker_conn, database_url):
    task_id = clean_db.execute("INSERT INTO tasks (operation, max_attempts) VALUES ('compute', 2) RETURNING task_id").fetchone()["task_id"]
    # Two runs used, then an operator lowers the limit of the re-queued task.
    worker_conn.execute("UPDATE tasks SET status = 'running', attempts = 2 WHERE task_id = %s", (task_id,))
    worker_conn.execute("UPDATE tasks SET status = 'pending', error_message = 'boom' WHERE task_id = %s", (task_id,))
    clean_db.execute("UPDATE tasks SET max_attempts = 1 WHERE task_id = %s", (task_id,))
    with connect(database_url) as fetcher:
        job = fetch(fetcher, register_worker(clean_db))
    assert job["args"]["claimed"] is None
    row = task_row(clean_db, task_id)
    assert row["status"] == "failed" and row["attempts"] == 2
    assert row["error_message"] == "no attempt left (2 of 1 used); last error: boom"


def test_a_run_cut_short_by_shutdown_gives_its_attempt_back(clean_db, database_url):
    task_id = insert_task(clean_db)
    with connect(database_url) as fetcher:
        claimed = fetch(fetcher, register_worker(clean_db))["args"]["claimed"]
        fetcher.execute("SELECT * FROM asyncproc_worker_release(%s, %s, 'shutdown')", (task_id, claimed["attempts"]))
    row = task_row(clean_db, task_id)
    assert row["status"] == "pending" and row["attempts"] == 0
    assert [job["status"] for job in jobs_for(clean_db, task_id)] == ["doing", "todo"]


# 4. Access: the SECURITY DEFINER functions are not anybody's.


@pytest.fixture
def stranger(clean_db, database_url):
    """A login role with no rights on tasks at all."""
    role = "asyncproc_test_stranger"
    clean_db.execute(f"DROP ROLE IF EXISTS {role}")
    clean_db.execute(f"CREATE ROLE {role} LOGIN")
    try:
        with connect(make_conninfo(database_url, user=role)) as conn:
            yield conn
    finally:
        clean_db.execute(f"DROP OWNED BY {role}")
        clean_db.execute(f"DROP ROLE {role}")


@pytest.mark.parametrize(
    "call",
    [
        "SELECT asyncproc_delete_queued_job(%s)",
        "SELECT asyncproc_abort_running_job(%s)",
        "SELECT * FROM asyncproc_sweep(0)",
        "SELECT asyncproc_defer_jobs(ARRAY[%s]::uuid[], ARRAY[0], ARRAY[now()])",
        "SELECT * FROM asyncproc_worker_release(%s, 1, 'x')",
        "SELECT * FROM asyncproc_worker_complete_many(ARRAY[%s]::uuid[], ARRAY[1], ARRAY['1'::jsonb])",
        "SELECT * FROM asyncproc_cancel(%s)",
    ],
)
def test_a_role_without_rights_on_tasks_can_touch_no_task_through_our_functions(clean_db, stranger, call):
    task_id = insert_task(clean_db)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        stranger.execute(call.replace("%s", f"'{task_id}'"))
    assert task_row(clean_db, task_id)["status"] == "pending"
    assert [job["status"] for job in jobs_for(clean_db, task_id)] == ["todo"]


def test_no_security_definer_function_is_executable_by_public(clean_db):
    public = clean_db.execute(
        "SELECT proname FROM pg_proc"
        " WHERE prosecdef AND pronamespace = 'public'::regnamespace"
        "   AND (proacl IS NULL OR EXISTS ("
        "        SELECT 1 FROM aclexplode(proacl) AS acl WHERE acl.grantee = 0 AND acl.privilege_type = 'EXECUTE'))"
    ).fetchall()
    assert public == []


# 5. Reconciliation restores the invariant in both directions.


def test_a_pending_task_whose_job_was_deleted_by_hand_is_queued_again(clean_db):
    task_id = insert_task(clean_db)
    clean_db.execute("DELETE FROM procrastinate_jobs")
    assert sweep(clean_db)["redeferred"] == 1
    assert [job["task_id"] for job in todo_jobs(clean_db)] == [str(task_id)]


def test_rows_loaded_with_triggers_off_are_dispatched(clean_db):
    clean_db.execute("SET session_replication_role = replica")
    try:
        clean_db.execute("INSERT INTO tasks (operation) SELECT 'compute' FROM generate_series(1, 50)")
    finally:
        clean_db.execute("RESET session_replication_role")
    assert todo_jobs(clean_db) == []
    assert sweep(clean_db)["redeferred"] == 50
    assert len(todo_jobs(clean_db)) == 50


def test_a_running_task_without_a_doing_job_is_requeued(clean_db, database_url):
    task_id = insert_task(clean_db)
    with connect(database_url) as fetcher:
        fetch(fetcher, register_worker(clean_db))
    clean_db.execute("DELETE FROM procrastinate_jobs")
    assert sweep(clean_db)["requeued"] == 1
    row = task_row(clean_db, task_id)
    assert row["status"] == "pending" and row["attempts"] == 1
    assert [job["task_id"] for job in todo_jobs(clean_db)] == [str(task_id)]


def test_a_job_whose_task_is_gone_or_final_is_dropped(clean_db, worker_conn):
    gone = insert_task(clean_db)
    clean_db.execute("DELETE FROM tasks WHERE task_id = %s", (gone,))
    kept = insert_task(clean_db)
    assert sweep(clean_db)["dropped"] == 1
    assert [job["task_id"] for job in todo_jobs(clean_db)] == [str(kept)]


def test_the_sweep_leaves_the_jobs_of_another_procrastinate_app_alone(clean_db):
    # Another app's tasks in the same database: one without arguments, one whose
    # arguments happen to name a task_id that is no task of ours.
    clean_db.execute(
        """
        SELECT procrastinate_defer_jobs_v1(ARRAY[
            ROW('reports', 'reports.build', 5, NULL, NULL, '{}'::jsonb, NULL)::procrastinate_job_to_defer_v1,
            ROW('reports', 'reports.build', 5, NULL, NULL,
                jsonb_build_object('task_id', gen_random_uuid()), NULL)::procrastinate_job_to_defer_v1])
        """
    )
    ours = insert_task(clean_db)
    assert sweep(clean_db)["dropped"] == 0
    assert clean_db.execute(
        "SELECT count(*) AS n FROM procrastinate_jobs WHERE task_name = 'reports.build' AND status = 'todo'"
    ).fetchone()["n"] == 2
    assert [job["task_id"] for job in todo_jobs(clean_db) if job["task_id"] == str(ours)] == [str(ours)]


def test_an_operator_cannot_edit_the_attempts_of_a_running_task(clean_db, database_url):
    task_id = insert_task(clean_db)
    with connect(database_url) as fetcher:
        fetch(fetcher, register_worker(clean_db))
    with pytest.raises(psycopg.errors.CheckViolation, match="written by the worker only"):
        clean_db.execute("UPDATE tasks SET attempts = 0 WHERE task_id = %s", (task_id,))
    assert task_row(clean_db, task_id)["attempts"] == 1


# 6. One locked row costs one skipped task, not the fetch loop.


def test_a_row_locked_in_psql_does_not_stop_the_fetch(clean_db, database_url):
    locked = insert_task(clean_db)
    free = insert_task(clean_db)
    worker_id = register_worker(clean_db)
    with connect(database_url) as psql, connect(database_url, application_name="test-fetcher") as fetcher:
        psql.autocommit = False
        psql.execute("SELECT 1 FROM tasks WHERE task_id = %s FOR UPDATE", (locked,))
        first = Background(lambda: fetch(fetcher, worker_id))
        assert first.join(5), "the fetch waited for a row lock held in psql"
        assert first.error is None, first.error
        assert first.result["args"]["claimed"] is None
        second = fetch(fetcher, worker_id)
        assert second["args"]["claimed"]["task_id"] == str(free)
        psql.rollback()
    # The skipped task was queued again, a second later, and is then claimed.
    (requeued,) = todo_jobs(clean_db)
    assert requeued["task_id"] == str(locked) and requeued["scheduled_at"] is not None
    clean_db.execute("UPDATE procrastinate_jobs SET scheduled_at = NULL WHERE status = 'todo'")
    with connect(database_url) as fetcher:
        assert fetch(fetcher, worker_id)["args"]["claimed"]["task_id"] == str(locked)


# 7. SQL edits of a pending task take effect.


def test_postponing_a_pending_task_in_sql_postpones_its_job(clean_db, database_url):
    task_id = insert_task(clean_db)
    clean_db.execute("UPDATE tasks SET scheduled_at = now() + interval '1 hour' WHERE task_id = %s", (task_id,))
    (job,) = todo_jobs(clean_db)
    assert job["scheduled_at"] == task_row(clean_db, task_id)["scheduled_at"]
    with connect(database_url) as fetcher:
        assert fetch(fetcher, register_worker(clean_db)) is None
    clean_db.execute("UPDATE tasks SET scheduled_at = now() WHERE task_id = %s", (task_id,))
    with connect(database_url) as fetcher:
        assert fetch(fetcher, register_worker(clean_db))["args"]["claimed"]["task_id"] == str(task_id)


def test_raising_a_pending_tasks_priority_in_sql_runs_it_first(clean_db, database_url):
    first = insert_task(clean_db)
    urgent = insert_task(clean_db)
    clean_db.execute("UPDATE tasks SET priority = 100 WHERE task_id = %s", (urgent,))
    assert {job["task_id"]: job["priority"] for job in todo_jobs(clean_db)} == {str(first): 0, str(urgent): 100}
    with connect(database_url) as fetcher:
        assert fetch(fetcher, register_worker(clean_db))["args"]["claimed"]["task_id"] == str(urgent)


def test_the_claim_checks_the_tasks_own_time(clean_db, database_url):
    task_id = clean_db.execute(
        "INSERT INTO tasks (operation, scheduled_at) VALUES ('compute', now() + interval '1 hour') RETURNING task_id"
    ).fetchone()["task_id"]
    # A stale job that says "now", as a job left behind by a race would.
    clean_db.execute("UPDATE procrastinate_jobs SET scheduled_at = NULL")
    with connect(database_url) as fetcher:
        job = fetch(fetcher, register_worker(clean_db))
    assert job["args"]["claimed"] is None
    assert task_row(clean_db, task_id)["status"] == "pending"
    (requeued,) = todo_jobs(clean_db)
    assert requeued["scheduled_at"] == task_row(clean_db, task_id)["scheduled_at"]


def test_the_sweep_repairs_a_job_with_a_stale_priority(clean_db):
    task_id = insert_task(clean_db)
    clean_db.execute("UPDATE procrastinate_jobs SET priority = -5")
    assert sweep(clean_db)["redeferred"] == 1
    assert [(job["task_id"], job["priority"]) for job in todo_jobs(clean_db)] == [(str(task_id), 0)]


# 10. The worker is who runs the worker's functions, whatever its connection is called.


def test_a_worker_whose_pool_is_renamed_still_claims(clean_db, database_url):
    task_id = insert_task(clean_db)
    with connect(database_url, application_name="renamed-pool") as fetcher:
        job = fetch(fetcher, register_worker(clean_db))
    assert job["args"]["claimed"]["task_id"] == str(task_id)
    assert task_row(clean_db, task_id)["status"] == "running"


def test_naming_a_connection_after_the_worker_grants_nothing(clean_db, database_url):
    task_id = insert_task(clean_db)
    with connect(database_url, application_name="asyncproc-worker") as impostor:
        with pytest.raises(psycopg.errors.CheckViolation, match="invalid task status transition"):
            impostor.execute("UPDATE tasks SET status = 'running' WHERE task_id = %s", (task_id,))


# Poison rows: no payload can fail the fetch.


@pytest.mark.parametrize(
    "payload",
    ['{"n": ' + "9" * 5000 + "}", '{"deep": ' + "[" * 3000 + "]" * 3000 + "}"],
    ids=["5000-digit number", "nested 3000 deep"],
)
def test_a_poison_payload_travels_as_text_and_cannot_fail_the_fetch(clean_db, database_url, payload):
    task_id = insert_task(clean_db, payload=payload)
    with connect(database_url) as fetcher:
        job = fetch(fetcher, register_worker(clean_db))
    claimed = job["args"]["claimed"]
    assert claimed["task_id"] == str(task_id)
    assert "payload" not in claimed and isinstance(claimed["payload_json"], str)


def test_a_job_that_falls_due_is_fetched_in_priority_order_with_the_due_ones(clean_db):
    worker_id = register_worker(clean_db)
    later = insert_task(clean_db)
    clean_db.execute(
        "UPDATE tasks SET priority = 5, scheduled_at = clock_timestamp() + interval '0.3 seconds' WHERE task_id = %s",
        (later,),
    )
    first, second = insert_task(clean_db), insert_task(clean_db)
    (queued,) = [job for job in todo_jobs(clean_db) if job["task_id"] == str(later)]
    assert queued["scheduled_at"] is not None
    assert fetch(clean_db, worker_id)["args"]["task_id"] == str(first)
    wait_for(
        lambda: clean_db.execute("SELECT clock_timestamp() > %s AS due", (queued["scheduled_at"],)).fetchone()["due"],
        5,
        "the task's time to come",
    )
    assert [fetch(clean_db, worker_id)["args"]["task_id"] for _ in range(2)] == [str(later), str(second)]
