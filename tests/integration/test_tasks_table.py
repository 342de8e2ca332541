"""The tasks table as a queue: triggers, the status machine, stalled-job repair."""

from __future__ import annotations

import psycopg
import pytest

from tests.support import fail_task, insert_task, jobs_for


def test_a_plain_insert_queues_exactly_one_job(clean_db):
    task_id = insert_task(clean_db)
    (job,) = jobs_for(clean_db, task_id)
    assert job["status"] == "todo"
    assert job["args"] == {"task_id": str(task_id)}
    assert job["queueing_lock"] == str(task_id)
    assert job["scheduled_at"] is None


def test_a_multi_row_insert_queues_one_job_per_row(clean_db):
    clean_db.execute(
        "INSERT INTO tasks (operation, payload) SELECT 'sleep', jsonb_build_object('seconds', i) FROM generate_series(1, 5) i"
    )
    counts = clean_db.execute(
        "SELECT (SELECT count(*) FROM tasks) AS tasks, (SELECT count(*) FROM procrastinate_jobs) AS jobs"
    ).fetchone()
    assert counts == {"tasks": 5, "jobs": 5}


def test_a_rolled_back_insert_leaves_neither_row(clean_db):
    with pytest.raises(RuntimeError):
        with clean_db.transaction():
            insert_task(clean_db)
            raise RuntimeError("client gave up")
    counts = clean_db.execute(
        "SELECT (SELECT count(*) FROM tasks) AS tasks, (SELECT count(*) FROM procrastinate_jobs) AS jobs"
    ).fetchone()
    assert counts == {"tasks": 0, "jobs": 0}


def test_a_future_task_is_scheduled_in_its_job(clean_db):
    task_id = clean_db.execute(
        "INSERT INTO tasks (operation, scheduled_at) VALUES ('compute', now() + interval '1 hour') RETURNING task_id"
    ).fetchone()["task_id"]
    (job,) = jobs_for(clean_db, task_id)
    assert job["scheduled_at"] is not None


def test_result_holds_the_seed_example_result(clean_db, worker_conn):
    task_id = insert_task(clean_db)
    worker_conn.execute("UPDATE tasks SET status = 'running' WHERE task_id = %s", (task_id,))
    worker_conn.execute("UPDATE tasks SET status = 'completed', result = '499999500000' WHERE task_id = %s", (task_id,))
    row = clean_db.execute("SELECT result, completed_at FROM tasks WHERE task_id = %s", (task_id,)).fetchone()
    assert row["result"] == 499999500000
    assert row["completed_at"] is not None


def test_a_new_row_must_be_pending_and_starts_clean(clean_db):
    with pytest.raises(psycopg.errors.CheckViolation, match="must be pending"):
        clean_db.execute("INSERT INTO tasks (operation, status) VALUES ('compute', 'completed')")
    task_id = clean_db.execute(
        "INSERT INTO tasks (operation, attempts, result) VALUES ('compute', 7, '1') RETURNING task_id"
    ).fetchone()["task_id"]
    row = clean_db.execute("SELECT attempts, result FROM tasks WHERE task_id = %s", (task_id,)).fetchone()
    assert row == {"attempts": 0, "result": None}


@pytest.mark.parametrize(
    "path",
    [
        ["running", "completed", "running"],
        ["running", "completed", "pending"],
        ["completed"],
        ["failed"],
        ["running", "failed", "running"],
    ],
)
def test_invalid_transitions_are_rejected_even_for_the_worker(clean_db, worker_conn, path):
    task_id = insert_task(clean_db)
    *allowed, forbidden = path
    for status in allowed:
        worker_conn.execute("UPDATE tasks SET status = %s WHERE task_id = %s", (status, task_id))
    with pytest.raises(psycopg.errors.CheckViolation, match="invalid task status transition"):
        worker_conn.execute("UPDATE tasks SET status = %s WHERE task_id = %s", (forbidden, task_id))


@pytest.mark.parametrize(
    "setup,forbidden,hint",
    [
        ([], "running", "the worker does the rest"),
        (["running"], "completed", "the worker does the rest"),
        (["running"], "pending", "cancel it first"),
        (["running", "completed"], "running", "a completed task is final"),
    ],
)
def test_operators_cannot_do_the_workers_transitions(clean_db, worker_conn, setup, forbidden, hint):
    task_id = insert_task(clean_db)
    for status in setup:
        worker_conn.execute("UPDATE tasks SET status = %s WHERE task_id = %s", (status, task_id))
    with pytest.raises(psycopg.errors.CheckViolation) as raised:
        clean_db.execute("UPDATE tasks SET status = %s WHERE task_id = %s", (forbidden, task_id))
    assert hint in raised.value.diag.message_hint


def test_retrying_a_failed_task_queues_a_new_job_and_keeps_its_history(clean_db, worker_conn):
    task_id = insert_task(clean_db)
    clean_db.execute("DELETE FROM procrastinate_jobs")
    fail_task(worker_conn, task_id, attempts=3)
    clean_db.execute("UPDATE tasks SET status = 'pending' WHERE status = 'failed'")
    row = clean_db.execute(
        "SELECT status, attempts, max_attempts, error_message, completed_at FROM tasks WHERE task_id = %s", (task_id,)
    ).fetchone()
    assert row == {"status": "pending", "attempts": 3, "max_attempts": 4, "error_message": "boom", "completed_at": None}
    assert [job["status"] for job in jobs_for(clean_db, task_id)] == ["todo"]


def test_cancelling_a_pending_task_removes_its_queued_job(clean_db):
    task_id = insert_task(clean_db)
    clean_db.execute("UPDATE tasks SET status = 'cancelled' WHERE task_id = %s", (task_id,))
    assert jobs_for(clean_db, task_id) == []
    clean_db.execute("UPDATE tasks SET status = 'pending' WHERE task_id = %s", (task_id,))
    assert [job["status"] for job in jobs_for(clean_db, task_id)] == ["todo"]


def test_deferring_twice_queues_one_job(clean_db):
    task_id = insert_task(clean_db)
    clean_db.execute(
        "SELECT asyncproc_defer_jobs(ARRAY[task_id], ARRAY[priority], ARRAY[scheduled_at]) FROM tasks WHERE task_id = %s",
        (task_id,),
    )
    assert len(jobs_for(clean_db, task_id)) == 1


def _orphan_running_task(conn, worker_conn, worker_alive: bool) -> str:
    """A running task whose job is 'doing' for a worker, as after a claim."""
    task_id = insert_task(conn)
    worker_id = conn.execute("SELECT procrastinate_register_worker_v1() AS id").fetchone()["id"]
    if not worker_alive:
        conn.execute(
            "UPDATE procrastinate_workers SET last_heartbeat = now() - interval '1 hour' WHERE id = %s", (worker_id,)
        )
    # As a worker's fetch does: the job goes to 'doing' and claims its task (migrations/0006).
    worker_conn.execute("UPDATE procrastinate_jobs SET status = 'doing', worker_id = %s", (worker_id,))
    assert conn.execute("SELECT status, attempts FROM tasks WHERE task_id = %s", (task_id,)).fetchone() == {
        "status": "running",
        "attempts": 1,
    }
    return task_id


def sweep(conn) -> dict:
    return conn.execute("SELECT requeued, failed, redeferred, dropped FROM asyncproc_sweep(30)").fetchone()


def test_a_task_of_a_dead_worker_is_requeued(clean_db, worker_conn):
    task_id = _orphan_running_task(clean_db, worker_conn, worker_alive=False)
    assert sweep(clean_db)["requeued"] == 1
    row = clean_db.execute("SELECT status, attempts, error_message FROM tasks WHERE task_id = %s", (task_id,)).fetchone()
    assert row == {
        "status": "pending",
        "attempts": 1,
        "error_message": "worker lost during attempt 1 of 3 (killed, crashed or stalled)",
    }
    assert [job["status"] for job in jobs_for(clean_db, task_id)] == ["todo"]


def test_a_task_of_a_live_worker_is_left_alone(clean_db, worker_conn):
    task_id = _orphan_running_task(clean_db, worker_conn, worker_alive=True)
    assert sweep(clean_db) == {"requeued": 0, "failed": 0, "redeferred": 0, "dropped": 0}
    assert clean_db.execute("SELECT status FROM tasks WHERE task_id = %s", (task_id,)).fetchone()["status"] == "running"


def test_a_pending_task_whose_job_aborted_gets_a_new_job(clean_db, worker_conn):
    task_id = insert_task(clean_db)
    clean_db.execute("UPDATE procrastinate_jobs SET status = 'aborted'")
    assert sweep(clean_db)["redeferred"] == 1
    assert [job["status"] for job in jobs_for(clean_db, task_id)] == ["todo"]
