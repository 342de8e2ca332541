"""The operator's SQL: retry and cancel functions, reporting views, least privilege."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from tests.support import fail_task, insert_task, jobs_for


def status_of(conn, task_id) -> str:
    return conn.execute("SELECT status FROM tasks WHERE task_id = %s", (task_id,)).fetchone()["status"]


def test_asyncproc_retry_requeues_a_failed_task(clean_db, worker_conn):
    task_id = insert_task(clean_db)
    fail_task(worker_conn, task_id)
    row = clean_db.execute("SELECT task_id, status, attempts FROM asyncproc_retry(%s)", (task_id,)).fetchone()
    assert row == {"task_id": task_id, "status": "pending", "attempts": 1}
    assert [job["status"] for job in jobs_for(clean_db, task_id)] == ["todo"]


def test_asyncproc_retry_refuses_a_running_task_and_unknown_ids(clean_db, worker_conn):
    task_id = insert_task(clean_db)
    worker_conn.execute("UPDATE tasks SET status = 'running' WHERE task_id = %s", (task_id,))
    with pytest.raises(psycopg.errors.CheckViolation, match="is running: only failed or cancelled"):
        clean_db.execute("SELECT * FROM asyncproc_retry(%s)", (task_id,))
    with pytest.raises(psycopg.errors.NoDataFound):
        clean_db.execute("SELECT * FROM asyncproc_retry('00000000-0000-4000-8000-000000000000')")


def test_asyncproc_retry_failed_counts_and_filters(clean_db, worker_conn):
    ids = [insert_task(clean_db, operation=op) for op in ("compute", "compute", "sleep")]
    for task_id in ids:
        fail_task(worker_conn, task_id)
    assert clean_db.execute("SELECT asyncproc_retry_failed('1 hour', 'compute') AS n").fetchone()["n"] == 2
    assert [status_of(clean_db, t) for t in ids] == ["pending", "pending", "failed"]
    assert clean_db.execute("SELECT asyncproc_retry_failed('1 hour') AS n").fetchone()["n"] == 1
    assert clean_db.execute("SELECT asyncproc_retry_failed('1 hour') AS n").fetchone()["n"] == 0


def test_asyncproc_cancel_stops_a_pending_task_for_good(clean_db, worker_conn):
    task_id = insert_task(clean_db)
    assert clean_db.execute("SELECT status FROM asyncproc_cancel(%s)", (task_id,)).fetchone()["status"] == "cancelled"
    assert jobs_for(clean_db, task_id) == []
    with pytest.raises(psycopg.errors.CheckViolation, match="only pending or running tasks can be cancelled"):
        clean_db.execute("SELECT * FROM asyncproc_cancel(%s)", (task_id,))


def test_cancelling_a_running_task_asks_its_job_to_abort(clean_db, worker_conn):
    task_id = insert_task(clean_db)
    worker_conn.execute("UPDATE procrastinate_jobs SET status = 'doing'")  # a fetch, which claims the task
    clean_db.execute("SELECT * FROM asyncproc_cancel(%s)", (task_id,))
    job = clean_db.execute("SELECT status::text, abort_requested FROM procrastinate_jobs").fetchone()
    assert job == {"status": "doing", "abort_requested": True}


def test_reporting_views_answer_their_questions(clean_db, worker_conn):
    done = insert_task(clean_db, operation="compute")
    worker_conn.execute("UPDATE tasks SET status = 'running', started_at = now() - interval '2 seconds' WHERE task_id = %s", (done,))
    worker_conn.execute("UPDATE tasks SET status = 'completed', result = '1' WHERE task_id = %s", (done,))
    broken = insert_task(clean_db, operation="fail")
    fail_task(worker_conn, broken, error="kaput")
    stuck = insert_task(clean_db, operation="sleep")
    worker_conn.execute("UPDATE tasks SET status = 'running', started_at = now() - interval '1 hour' WHERE task_id = %s", (stuck,))
    insert_task(clean_db, operation="compute")

    counts = {(r["status"], r["operation"]): r["tasks"] for r in clean_db.execute("SELECT * FROM asyncproc_status_counts")}
    assert counts == {("completed", "compute"): 1, ("failed", "fail"): 1, ("running", "sleep"): 1, ("pending", "compute"): 1}
    minute = clean_db.execute("SELECT operation, completed, failed FROM asyncproc_throughput_per_minute ORDER BY operation").fetchall()
    assert minute == [{"operation": "compute", "completed": 1, "failed": 0}, {"operation": "fail", "completed": 0, "failed": 1}]
    assert clean_db.execute("SELECT sum(completed) AS n FROM asyncproc_throughput_per_hour").fetchone()["n"] == 1
    latency = clean_db.execute("SELECT operation, tasks, run_p50 FROM asyncproc_latency_last_hour").fetchone()
    assert latency["operation"] == "compute" and latency["tasks"] == 1
    assert latency["run_p50"].total_seconds() >= 2
    failures = clean_db.execute("SELECT task_id, error_message FROM asyncproc_recent_failures").fetchall()
    assert failures == [{"task_id": broken, "error_message": "kaput"}]
    assert [r["task_id"] for r in clean_db.execute("SELECT task_id FROM asyncproc_stuck_tasks")] == [stuck]
    assert clean_db.execute("SELECT task_id FROM asyncproc_stuck('2 hours')").fetchall() == []
    queue = clean_db.execute("SELECT pending, ready, oldest_pending_age FROM asyncproc_queue").fetchone()
    assert queue["pending"] == 1 and queue["ready"] == 1 and queue["oldest_pending_age"].total_seconds() >= 0


def test_the_operator_role_needs_no_rights_on_procrastinate_tables(clean_db, worker_conn, database_url):
    role = "asyncproc_test_operator"
    clean_db.execute(f"DROP ROLE IF EXISTS {role}")
    clean_db.execute(f"CREATE ROLE {role} LOGIN")
    try:
        # As the README tells an admin to give a person the operator's rights.
        clean_db.execute(f"GRANT asyncproc_operator TO {role}")
        failed = insert_task(clean_db)
        fail_task(worker_conn, failed)
        with psycopg.connect(make_conninfo(database_url, user=role), autocommit=True) as operator:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                operator.execute("SELECT count(*) FROM procrastinate_jobs")
            for view in ("asyncproc_status_counts", "asyncproc_queue", "asyncproc_recent_failures", "asyncproc_latency_last_hour"):
                operator.execute(f"SELECT * FROM {view}").fetchall()
            operator.execute("SELECT * FROM asyncproc_retry(%s)", (failed,))
            enqueued = operator.execute("INSERT INTO tasks (operation) VALUES ('compute') RETURNING task_id").fetchone()[0]
            operator.execute("SELECT * FROM asyncproc_cancel(%s)", (enqueued,))
        assert status_of(clean_db, failed) == "pending"
        assert [job["status"] for job in jobs_for(clean_db, failed)] == ["todo"]
        assert status_of(clean_db, enqueued) == "cancelled"
    finally:
        clean_db.execute(f"DROP OWNED BY {role}")
        clean_db.execute(f"DROP ROLE {role}")
