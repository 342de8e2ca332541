"""Exact counts by status and operation, and the history of finished tasks, kept by triggers.

Ground truth is always a GROUP BY over `tasks` itself, taken in the same
snapshot as the counts.
"""

from __future__ import annotations

import psycopg
import pytest

from asyncproc import db
from asyncproc.metrics import SECONDS_BUCKETS

TRUTH = "SELECT status, operation, count(*) AS tasks FROM tasks GROUP BY status, operation"
COUNTED = "SELECT status, operation, tasks FROM asyncproc_status_counts"
HISTORY = "SELECT operation, status, sum(count) AS tasks FROM asyncproc_history GROUP BY operation, status"


def _rows(conn: psycopg.Connection, sql: str) -> set[tuple]:
    return {tuple(row.values()) for row in conn.execute(sql).fetchall()}


def assert_counts_exact(conn: psycopg.Connection) -> None:
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        assert _rows(conn, COUNTED) == _rows(conn, TRUTH)


def history(conn: psycopg.Connection) -> dict[tuple[str, str], int]:
    return {(row["operation"], row["status"]): row["tasks"] for row in conn.execute(HISTORY).fetchall()}


def _insert(conn: psycopg.Connection, operation: str, n: int = 1) -> list:
    rows = conn.execute(
        "INSERT INTO tasks (operation) SELECT %s FROM generate_series(1, %s) RETURNING task_id", (operation, n)
    ).fetchall()
    return [row["task_id"] for row in rows]


def _finish(worker: psycopg.Connection, task_id, status: str) -> None:
    worker.execute("UPDATE tasks SET status = 'running', attempts = attempts + 1, started_at = now() WHERE task_id = %s", (task_id,))
    worker.execute("UPDATE tasks SET status = %s WHERE task_id = %s", (status, task_id))


def test_counts_stay_exact_through_every_kind_of_write(clean_db, worker_conn):
    conn = clean_db
    a = _insert(conn, "count.a", 5)
    b = _insert(conn, "count.b", 3)
    assert_counts_exact(conn)
    _finish(worker_conn, a[0], "completed")
    _finish(worker_conn, a[1], "failed")
    worker_conn.execute("UPDATE tasks SET status = 'running', attempts = 1, started_at = now() WHERE task_id = %s", (a[2],))
    assert_counts_exact(conn)
    # A worker's retry (running -> pending), an operator's retry, a cancel, an operation renamed.
    worker_conn.execute("UPDATE tasks SET status = 'pending' WHERE task_id = %s", (a[2],))
    conn.execute("SELECT asyncproc_retry(%s)", (a[1],))
    conn.execute("SELECT asyncproc_cancel(%s)", (b[0],))
    conn.execute("UPDATE tasks SET operation = 'count.c' WHERE task_id = %s", (b[1],))
    assert_counts_exact(conn)
    conn.execute("DELETE FROM tasks WHERE task_id = ANY(%s)", ([a[0], b[2]],))
    assert_counts_exact(conn)
    conn.execute("SELECT asyncproc_compact()")
    assert_counts_exact(conn)
    assert conn.execute("SELECT count(*) AS n FROM asyncproc_ledger_events").fetchone()["n"] == 0
    conn.execute("TRUNCATE tasks CASCADE")
    assert_counts_exact(conn)


def test_a_rolled_back_write_leaves_the_counts_alone(clean_db):
    with pytest.raises(psycopg.errors.CheckViolation):
        with clean_db.transaction():
            _insert(clean_db, "count.rollback", 2)
            clean_db.execute("INSERT INTO tasks (operation, status) VALUES ('count.rollback', 'completed')")
    assert_counts_exact(clean_db)


def test_concurrent_writers_of_one_operation_do_not_wait_on_each_other(clean_db, database_url):
    first, second = _insert(clean_db, "count.hot", 2)
    with db.connect(database_url) as other:
        with clean_db.transaction():
            clean_db.execute("SELECT asyncproc_cancel(%s)", (first,))
            # Held open: a single counter row per operation would now be locked.
            other.execute("SET lock_timeout = '1s'")
            other.execute("SELECT asyncproc_cancel(%s)", (second,))
            other.execute("INSERT INTO tasks (operation) VALUES ('count.hot')")
    assert_counts_exact(clean_db)


def test_bulk_loaded_rows_are_counted_after_a_recount(clean_db):
    with clean_db.transaction():
        clean_db.execute("SET LOCAL session_replication_role = replica")
        clean_db.execute(
            "INSERT INTO tasks (operation, status, attempts, started_at, completed_at)"
            " SELECT 'count.bulk', 'completed', 1, now() - interval '2 seconds', now() FROM generate_series(1, 50)"
        )
    clean_db.execute("SELECT asyncproc_recount(with_history => true)")
    assert_counts_exact(clean_db)
    row = clean_db.execute(
        "SELECT count, run_seconds_histogram, run_seconds_sum FROM asyncproc_history WHERE operation = 'count.bulk'"
    ).fetchone()
    # 2 s falls in [1, 2.5): the ninth slot.
    assert (row["count"], row["run_seconds_histogram"]) == (50, [0] * 8 + [50] + [0] * 10)
    assert row["run_seconds_sum"] == pytest.approx(100)


def test_every_finished_task_is_in_the_history_once_with_its_latest_outcome(clean_db, worker_conn):
    conn = clean_db
    before = history(conn)
    flaky, steady, dropped = _insert(conn, "history.once", 3)
    _finish(worker_conn, flaky, "failed")
    _finish(worker_conn, steady, "completed")
    conn.execute("SELECT asyncproc_cancel(%s)", (dropped,))
    # An automatic retry is not an outcome; an operator's retry takes the failure back.
    conn.execute("SELECT asyncproc_retry(%s)", (flaky,))
    worker_conn.execute("UPDATE tasks SET status = 'running', attempts = attempts + 1, started_at = now() WHERE task_id = %s", (flaky,))
    worker_conn.execute("UPDATE tasks SET status = 'pending' WHERE task_id = %s", (flaky,))
    _finish(worker_conn, flaky, "completed")
    after = history(conn)
    assert after.get(("history.once", "completed"), 0) - before.get(("history.once", "completed"), 0) == 2
    assert after.get(("history.once", "failed"), 0) == before.get(("history.once", "failed"), 0)
    assert after.get(("history.once", "cancelled"), 0) - before.get(("history.once", "cancelled"), 0) == 1
    # Deleting rows, by the pruner or by hand, and compacting leave the history as it was.
    conn.execute("DELETE FROM tasks WHERE operation = 'history.once'")
    conn.execute("SELECT asyncproc_compact()")
    assert history(conn) == after


def test_the_history_keeps_run_time_histograms_in_the_metrics_buckets(clean_db, worker_conn):
    bounds = clean_db.execute("SELECT asyncproc_seconds_bounds() AS b").fetchone()["b"]
    assert tuple(bounds) == tuple(float(b) for b in SECONDS_BUCKETS)
    (task_id,) = _insert(clean_db, "history.timed")
    worker_conn.execute(
        "UPDATE tasks SET status = 'running', attempts = 1, started_at = now() - interval '3 seconds' WHERE task_id = %s", (task_id,)
    )
    worker_conn.execute("UPDATE tasks SET status = 'completed' WHERE task_id = %s", (task_id,))
    row = clean_db.execute(
        "SELECT bucket_width, count, run_seconds_histogram, run_seconds_sum FROM asyncproc_history"
        " WHERE operation = 'history.timed'"
    ).fetchone()
    assert row["count"] == 1 and str(row["bucket_width"]) == "0:01:00"
    # 3 s falls in [2.5, 5): the tenth of 19 slots. The same before and after compaction.
    assert row["run_seconds_histogram"] == [0] * 9 + [1] + [0] * 9
    assert 3 <= row["run_seconds_sum"] < 5
    clean_db.execute("SELECT asyncproc_compact()")
    assert clean_db.execute(
        "SELECT run_seconds_histogram FROM asyncproc_history WHERE operation = 'history.timed'"
    ).fetchone()["run_seconds_histogram"] == row["run_seconds_histogram"]


def test_compaction_folds_old_minutes_into_hours_and_days_keeping_the_sums(clean_db):
    conn = clean_db
    conn.execute("DELETE FROM asyncproc_rollups WHERE operation LIKE 'fold.%%'")
    conn.execute(
        """
        INSERT INTO asyncproc_rollups (bucket_start, bucket_width, operation, status, tasks)
        SELECT date_trunc('minute', now() - i * interval '7 minutes', 'UTC'), '1 minute', 'fold.x', 'failed', 1
        FROM generate_series(1, 30000) AS i
        ON CONFLICT DO NOTHING
        """
    )
    total = conn.execute("SELECT sum(tasks) AS n FROM asyncproc_rollups WHERE operation = 'fold.x'").fetchone()["n"]
    conn.execute("SELECT asyncproc_compact()")
    widths = {
        str(row["bucket_width"]): row["oldest"]
        for row in conn.execute(
            "SELECT bucket_width, min(bucket_start) AS oldest FROM asyncproc_history WHERE operation = 'fold.x' GROUP BY 1"
        ).fetchall()
    }
    assert set(widths) == {"0:01:00", "1:00:00", "1 day, 0:00:00"}
    assert conn.execute("SELECT sum(count) AS n FROM asyncproc_history WHERE operation = 'fold.x'").fetchone()["n"] == total
    # No hour is left part minutes, part an hour.
    overlap = conn.execute(
        """
        SELECT count(*) AS n FROM asyncproc_history AS m JOIN asyncproc_history AS h
          ON h.operation = m.operation AND h.status = m.status AND h.bucket_width > m.bucket_width
         AND m.bucket_start >= h.bucket_start AND m.bucket_start < h.bucket_end
        WHERE m.operation = 'fold.x'
        """
    ).fetchone()["n"]
    assert overlap == 0
