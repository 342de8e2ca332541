"""Plan regression: every hot-path and sweep statement uses an index at a 100k backlog, statistics never analysed.

A queue's backlog is its normal state, and a table the planner has never
analysed is the normal state of a new deployment. auto_explain records the
plan of every statement, the ones run inside our triggers and functions
included, and the test fails on a sequential scan of tasks or
procrastinate_jobs, or on a bitmap scan, which on these tables means reading
the whole backlog's index.
"""

from __future__ import annotations

import contextlib
import re
from typing import Callable, Iterator
from uuid import UUID

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from asyncproc import db, ledger, migrate
from asyncproc.config import DatabaseSettings, Settings
from tests.support import new_owner

# Backlogs of 100,000 and 20,000 rows take half a minute or more to build on two
# cores: the full suite's, not the fast one's.
pytestmark = pytest.mark.full

BACKLOG = 100_000
_SCANNED_ROWS = re.compile(r"Scan[^\n]* on (?:tasks|procrastinate_jobs)\b[^\n]*\(actual rows=(\d+) loops=(\d+)\)")
_NODE = re.compile(r"\s*->  ")
_REMOVED = re.compile(r"Rows Removed by Filter: (\d+)")
_BAD_NODE = re.compile(r"(Seq Scan|Bitmap Heap Scan|Bitmap Index Scan) on (tasks|procrastinate_jobs)\b")


@pytest.fixture(scope="module")
def backlog_url(empty_database) -> str:
    url = empty_database()
    with db.connect(url) as conn:
        migrate.apply_all(conn, Settings().migrations_dir)
        # Never analysed: autovacuum would otherwise analyse the tables while the test runs.
        for table in ("tasks", "procrastinate_jobs", "procrastinate_events"):
            conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        conn.execute(
            "INSERT INTO tasks (operation, payload) SELECT 'compute', jsonb_build_object('n', i)"
            " FROM generate_series(1, %s) AS i",
            (BACKLOG,),
        )
        never = conn.execute(
            "SELECT count(*) AS n FROM pg_stat_user_tables"
            " WHERE relname IN ('tasks', 'procrastinate_jobs') AND last_analyze IS NULL AND last_autoanalyze IS NULL"
        ).fetchone()["n"]
        assert never == 2
    return url


@contextlib.contextmanager
def explaining(url: str, options: str = "") -> Iterator[tuple[psycopg.Connection, Callable[[], list[str]]]]:
    """A connection whose every statement, nested ones included, reports its plan; and a reader of those plans."""
    plans: list[str] = []
    with psycopg.connect(url, autocommit=True, row_factory=dict_row, options=options) as conn:
        conn.execute("LOAD 'auto_explain'")
        for setting, value in (
            ("auto_explain.log_min_duration", "0"),
            ("auto_explain.log_analyze", "on"),
            ("auto_explain.log_timing", "off"),
            ("auto_explain.log_nested_statements", "on"),
            ("auto_explain.log_level", "notice"),
            ("client_min_messages", "notice"),
        ):
            conn.execute(f"SET {setting} = '{value}'")
        conn.add_notice_handler(lambda diagnostic: plans.append(diagnostic.message_primary or ""))

        def taken() -> list[str]:
            found = list(plans)
            plans.clear()
            return found

        yield conn, taken


@pytest.fixture
def explained(backlog_url) -> Iterator[tuple[psycopg.Connection, Callable[[], list[str]]]]:
    """A connection with the worker's settings (db.worker_options), reporting its plans."""
    with explaining(backlog_url, db.worker_options(DatabaseSettings())) as session:
        yield session


def assert_indexed(plans: list[str], backlog: int = BACKLOG) -> None:
    assert plans, "auto_explain reported no plan"
    bad = [plan for plan in plans if _BAD_NODE.search(plan)]
    assert not bad, "a scan of the backlog:\n" + "\n\n".join(bad)
    # An index scan can read the backlog too (a whole index, materialized and
    # filtered): no scan of these tables may read more than a tenth of it.
    heavy = [plan for plan in plans if any(read > backlog // 10 for read in _rows_read(plan))]
    assert not heavy, "a plan that reads the backlog:\n" + "\n\n".join(heavy)


def _rows_read(plan: str) -> Iterator[int]:
    """Rows each scan of tasks or procrastinate_jobs read in all its loops: those it returned and those its
    filter removed (EXPLAIN gives both per loop)."""
    scan = None
    for line in plan.splitlines():
        found = _SCANNED_ROWS.search(line)
        if found or _NODE.match(line):
            if scan is not None:
                yield scan[0] * scan[1]
            scan = [int(found[1]), int(found[2])] if found else None
        elif scan is not None and (removed := _REMOVED.search(line)):
            scan[0] += int(removed[1])
    if scan is not None:
        yield scan[0] * scan[1]


def _new_worker(conn) -> int:
    return conn.execute("SELECT worker_id FROM procrastinate_register_worker_v1()").fetchone()["worker_id"]


def _fetch(conn, worker_id: int) -> dict:
    params = {"queues": ["asyncproc"], "worker_id": worker_id, "how_many": 1}
    return conn.execute(db.query("jobs_fetch"), params).fetchone()


def _complete(conn, jobs: list[dict]) -> None:
    """The worker's batched completion of the fetched `jobs`."""
    claimed = [job["args"]["claimed"] for job in jobs]
    conn.execute(db.query("tasks_mark_completed"), {
        "task_ids": [c["task_id"] for c in claimed],
        "attempts": [c["attempts"] for c in claimed],
        "results": [Jsonb({"n": i}) for i in range(len(jobs))],
        "job_ids": [job["id"] for job in jobs],
    })


def _newest_pending(conn) -> UUID:
    return conn.execute(
        "SELECT task_id FROM tasks WHERE status = 'pending' ORDER BY created_at DESC LIMIT 1"
    ).fetchone()["task_id"]


def _operator_changes(conn, task_id: UUID) -> None:
    """What an operator does to a pending task in psql: reschedule, reprioritise, cancel."""
    conn.execute("UPDATE tasks SET scheduled_at = now() + interval '1 hour' WHERE task_id = %s", (task_id,))
    conn.execute("UPDATE tasks SET priority = 5 WHERE task_id = %s", (task_id,))
    conn.execute("SELECT * FROM asyncproc_cancel(%s)", (task_id,))


def test_the_apis_insert_and_its_defer_probe_the_queueing_lock_index(backlog_url):
    with explaining(backlog_url) as (conn, plans):
        ledger.task_insert(conn, ledger.NewTask(operation="compute", payload={"n": 1}, max_attempts=3))
        assert_indexed(plans())


def test_fetch_and_claim_use_indexes(explained):
    conn, plans = explained
    worker_id = _new_worker(conn)
    plans()
    job = _fetch(conn, worker_id)
    assert job["args"]["claimed"] is not None
    assert_indexed(plans())


def test_outcome_writes_use_the_primary_key(explained):
    conn, plans = explained
    job = _fetch(conn, _new_worker(conn))
    claimed = job["args"]["claimed"]
    plans()
    conn.execute(db.query("task_mark_retry"), {
        "task_id": claimed["task_id"], "attempt": claimed["attempts"], "error_message": "boom", "delay_seconds": 0,
    })
    assert_indexed(plans())


def test_the_batched_completion_probes_the_primary_key(explained):
    conn, plans = explained
    worker_id = _new_worker(conn)
    jobs = [_fetch(conn, worker_id) for _ in range(3)]
    plans()
    _complete(conn, jobs)
    assert_indexed(plans())


def test_an_operators_insert_cancel_and_reschedule_use_indexes(backlog_url):
    # A psql session has none of the worker's settings: what our triggers run must plan well by itself.
    with explaining(backlog_url) as (conn, plans):
        task_id = _newest_pending(conn)
        plans()
        conn.execute("INSERT INTO tasks (operation) VALUES ('compute')")
        _operator_changes(conn, task_id)
        assert_indexed(plans())


def test_the_sweep_uses_indexes_wherever_it_is_called_from(backlog_url):
    with explaining(backlog_url) as (conn, plans):
        conn.execute("SELECT * FROM asyncproc_sweep(30)")
        assert_indexed(plans())



def test_a_fair_fetch_between_keys_uses_indexes(explained):
    conn, plans = explained
    busy, other = (new_owner(conn) for _ in range(2))
    # At a priority above the backlog's, so that a key's job heads the queue.
    conn.execute(
        "INSERT INTO tasks (operation, owner, priority) SELECT 'compute', %s, 1 FROM generate_series(1, %s)",
        (busy, BACKLOG // 5),
    )
    conn.execute("INSERT INTO tasks (operation, owner, priority) VALUES ('compute', %s, 1)", (other,))
    worker_id = _new_worker(conn)
    assert _fetch(conn, worker_id)["args"]["claimed"]["owner"] == busy
    plans()
    assert _fetch(conn, worker_id)["args"]["claimed"]["owner"] == other
    assert _fetch(conn, worker_id)["args"]["claimed"]["owner"] == busy
    assert_indexed(plans())


def test_a_fetch_reads_none_of_a_far_future_backlog(explained):
    conn, plans = explained
    # Above the backlog's priority, so that Procrastinate's own order would walk them all first.
    conn.execute(
        "INSERT INTO tasks (operation, priority, scheduled_at)"
        " SELECT 'compute', 2, now() + interval '1 day' FROM generate_series(1, %s)",
        (BACKLOG // 5,),
    )
    worker_id = _new_worker(conn)
    plans()
    assert _fetch(conn, worker_id)["args"]["claimed"]["priority"] == 1
    assert_indexed(plans())


def test_a_workers_fetch_plans_its_statements_once_not_on_every_call(explained):
    """PL/pgSQL plans a statement afresh for its first five calls, then keeps a
    generic plan only if it looks no dearer than the fresh ones: at a million
    queued jobs it never did, and every fetch planned its statements again
    (0.25 ms of a 0.5 ms empty fetch; figure 9). A generic plan keeps the queue
    names as a parameter ($1); one planned for the call has them as a constant.
    """
    conn, plans = explained
    worker_id = _new_worker(conn)
    plans()
    for _ in range(8):
        assert _fetch(conn, worker_id)["args"]["claimed"] is not None
        heads = [plan for plan in plans() if "ORDER BY priority DESC, id ASC" in plan]
        assert heads and all("$1 IS NULL" in plan for plan in heads), "a fetch planned for the call:\n" + "\n".join(heads)


def test_the_sweep_uses_indexes_once_the_tables_are_analysed(empty_database):
    # Statistics of a large pending backlog (autovacuum's ANALYZE) made the planner read every pending
    # task's entry of tasks_owner_active_idx to find the few running ones.
    url = empty_database()
    with db.connect(url) as conn:
        migrate.apply_all(conn, Settings().migrations_dir)
        conn.execute(
            "INSERT INTO tasks (operation, payload) SELECT 'compute', jsonb_build_object('n', i)"
            " FROM generate_series(1, %s) AS i",
            (BACKLOG,),
        )
        worker_id = _new_worker(conn)
        for _ in range(5):
            _fetch(conn, worker_id)
        conn.execute("ANALYZE tasks")
        conn.execute("ANALYZE procrastinate_jobs")
    with explaining(url) as (conn, plans):
        conn.execute("SELECT * FROM asyncproc_sweep(30)")
        assert_indexed(plans())


# Every JIT threshold at zero: the costs of a table of millions of rows, where the planner's estimates pass them.
_COSTED_AS_HUGE = " -c jit_above_cost=0 -c jit_inline_above_cost=0 -c jit_optimize_above_cost=0"


@pytest.mark.parametrize("role", ["api", "worker"])
def test_no_statement_of_the_service_is_compiled_by_jit(backlog_url, role):
    # At a million pending tasks, analysed, the sweep's reconciliation was costed at ~870k, past
    # jit_above_cost, and PostgreSQL compiled it with LLVM on every sweep: 0.5 s of CPU for a statement
    # that runs in 10 ms (3 s with the worker's load on two cores).
    options = (db.api_options if role == "api" else db.worker_options)(DatabaseSettings())
    with explaining(backlog_url, options + _COSTED_AS_HUGE) as (conn, plans):
        ledger.task_insert(conn, ledger.NewTask(operation="compute", payload={"n": 1}, max_attempts=3))
        conn.execute(db.query("task_get"), {"task_id": _fetch(conn, _new_worker(conn))["args"]["task_id"]})
        conn.execute("SELECT * FROM asyncproc_sweep(30)")
        found = plans()
    assert found, "auto_explain reported no plan"
    compiled = [plan for plan in found if "JIT:" in plan]
    assert not compiled, "compiled by JIT:\n" + "\n\n".join(compiled)


def test_a_worker_leaving_or_pruned_unbinds_its_jobs_through_an_index(backlog_url):
    # Deleting a worker sets its jobs' worker_id to NULL (the foreign key's ON DELETE SET NULL), by a
    # query on worker_id alone that Procrastinate's partial index (doing jobs only) cannot serve: every
    # graceful stop, and every stalled worker the sweep prunes, read the whole backlog of jobs.
    with explaining(backlog_url, db.worker_options(DatabaseSettings())) as (conn, plans):
        leaving, stalled = _new_worker(conn), _new_worker(conn)
        _fetch(conn, leaving)
        _fetch(conn, stalled)
        conn.execute(
            "UPDATE procrastinate_workers SET last_heartbeat = now() - interval '1 hour' WHERE id = %s", (stalled,)
        )
        plans()
        conn.execute("SELECT procrastinate_unregister_worker_v1(%s)", (leaving,))
        conn.execute("SELECT * FROM asyncproc_sweep(30)")
        assert_indexed(plans())
        assert conn.execute(
            "SELECT count(*) AS n FROM procrastinate_jobs WHERE worker_id IN (%s, %s)", (leaving, stalled)
        ).fetchone()["n"] == 0


STALE_BACKLOG = 20_000


@pytest.fixture(scope="module")
def stale_url(empty_database) -> str:
    """Statistics taken when every task had finished (a month of history, then cleared), then a backlog the planner never saw.

    The statistics say no task is pending, so every index on status looks like
    it leads to no row at all, the cheapest path to any pending task.
    """
    url = empty_database()
    with db.connect(url) as conn:
        migrate.apply_all(conn, Settings().migrations_dir)
        for table in ("tasks", "procrastinate_jobs", "procrastinate_events"):
            conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        with conn.transaction():
            conn.execute("SET LOCAL session_replication_role = replica")
            conn.execute(
                "INSERT INTO tasks (operation, status, result, attempts, created_at, started_at, completed_at)"
                " SELECT 'compute', 'completed', 'null', 1, t, t, t"
                " FROM (SELECT now() - make_interval(secs => i) AS t FROM generate_series(1, %s) AS i) AS s",
                (STALE_BACKLOG,),
            )
        conn.execute("SELECT asyncproc_recount()")
        conn.execute("ANALYZE tasks")
        conn.execute("ANALYZE procrastinate_jobs")
        # As the bench clears figure 11's history: the table's size is forgotten, its columns' statistics stay.
        conn.execute("TRUNCATE tasks")
        conn.execute(
            "INSERT INTO tasks (operation, payload) SELECT 'compute', jsonb_build_object('n', i)"
            " FROM generate_series(1, %s) AS i",
            (STALE_BACKLOG,),
        )
        # Newer tasks ahead of the backlog, as figure 9's: the head of the queue is at the far end of every
        # index on (status, created_at), where a walk from the oldest pending task reaches it last.
        conn.execute("INSERT INTO tasks (operation, priority) SELECT 'compute', 1 FROM generate_series(1, 100)")
    return url


def test_the_hot_path_and_the_sweep_use_indexes_under_statistics_that_predate_the_backlog(stale_url):
    # Figure 9 after figure 11 (a month of history analysed, then a million pending tasks): the sweep's
    # reconciliation joined every pending task with every pending task through the status index (over a
    # minute per sweep; the workers' throughput fell to a fifth).
    timeout = " -c statement_timeout=30s"
    with explaining(stale_url, db.worker_options(DatabaseSettings()) + timeout) as (conn, plans):
        ledger.task_insert(conn, ledger.NewTask(operation="compute", payload={"n": 1}, max_attempts=3))
        worker_id = _new_worker(conn)
        jobs = [_fetch(conn, worker_id) for _ in range(3)]
        _complete(conn, jobs)
        conn.execute("SELECT * FROM asyncproc_sweep(30)")
        assert_indexed(plans(), STALE_BACKLOG)
    with explaining(stale_url, timeout) as (conn, plans):
        task_id = _newest_pending(conn)
        plans()
        _operator_changes(conn, task_id)
        conn.execute("SELECT * FROM asyncproc_sweep(30)")
        assert_indexed(plans(), STALE_BACKLOG)
