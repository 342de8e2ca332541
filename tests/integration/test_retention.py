"""The pruner: finished tasks past their retention go, in bounded batches, one pruner at a time,
and never a task that is not final. The history keeps what was pruned."""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from asyncproc import cli, db, retention
from asyncproc.config import DatabaseSettings, RetentionSettings
from asyncproc.loops import LoopHealth, run_periodically
from asyncproc.retention import COMPACT_SECONDS
from tests.support import PROJECT_ROOT
from worker.pruner import LedgerUpkeep, upkeep_period

DOCS = (PROJECT_ROOT / "docs" / "retention.md").read_text()
KEEP = {"keep_completed": timedelta(days=7), "keep_failed": timedelta(days=30), "keep_cancelled": timedelta(days=7)}
PRUNE = "SELECT asyncproc_prune(%(keep_completed)s, %(keep_failed)s, %(keep_cancelled)s, %(batch)s) AS pruned"


def seed(conn: psycopg.Connection, operation: str, status: str, age: str, n: int = 1) -> None:
    """Rows that finished (or were created, when not final) `age` ago, loaded with triggers off
    as a bulk load would be; then the counts and history are rebuilt from them."""
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute(
            """
            INSERT INTO tasks (operation, status, attempts, created_at, scheduled_at, started_at, completed_at, updated_at)
            SELECT %(op)s, %(status)s, 1, t - interval '1 minute', t - interval '1 minute', t - interval '2 seconds',
                   CASE WHEN %(status)s IN ('completed', 'failed', 'cancelled') THEN t END, t
            FROM generate_series(1, %(n)s), LATERAL (SELECT now() - %(age)s::interval) AS s(t)
            """,
            {"op": operation, "status": status, "age": age, "n": n},
        )
    conn.execute("SELECT asyncproc_recount()")


def statuses(conn: psycopg.Connection, operation: str) -> dict[str, int]:
    rows = conn.execute("SELECT status, count(*) AS n FROM tasks WHERE operation = %s GROUP BY status", (operation,))
    return {row["status"]: row["n"] for row in rows.fetchall()}


def prune_all(conn: psycopg.Connection, batch: int = 1000, **keep) -> int:
    total = 0
    while True:
        pruned = conn.execute(PRUNE, {**KEEP, **keep, "batch": batch}).fetchone()["pruned"]
        total += pruned
        if pruned < batch:
            return total


def test_only_final_tasks_past_their_retention_are_pruned(clean_db):
    conn = clean_db
    for status in ("pending", "running", "completed", "failed", "cancelled"):
        seed(conn, "prune.mix", status, "40 days", 3)
    seed(conn, "prune.mix", "completed", "6 days", 2)
    seed(conn, "prune.mix", "failed", "20 days", 2)
    assert prune_all(conn, batch=4) == 9
    assert statuses(conn, "prune.mix") == {"pending": 3, "running": 3, "completed": 2, "failed": 2}
    assert conn.execute("SELECT count(*) AS n FROM asyncproc_status_counts WHERE tasks < 0").fetchone()["n"] == 0


def test_a_task_locked_by_someone_else_is_skipped_not_waited_for(clean_db, database_url):
    seed(clean_db, "prune.locked", "failed", "40 days", 2)
    with db.connect(database_url) as other:
        with other.transaction():
            locked = other.execute(
                "SELECT task_id FROM tasks WHERE operation = 'prune.locked' LIMIT 1 FOR UPDATE"
            ).fetchone()["task_id"]
            clean_db.execute("SET lock_timeout = '1s'")
            assert prune_all(clean_db) == 1
            # The operator's retry commits: the task is pending, and stays.
            other.execute("SELECT asyncproc_retry(%s)", (locked,))
    assert prune_all(clean_db) == 0
    assert statuses(clean_db, "prune.locked") == {"pending": 1}


def test_per_operation_overrides_win_over_the_defaults(clean_db):
    conn = clean_db
    for operation in ("prune.keep", "prune.short", "prune.default"):
        seed(conn, operation, "completed", "10 days", 2)
        seed(conn, operation, "failed", "2 days", 2)
    conn.execute(
        "INSERT INTO asyncproc_retention (operation, status, keep) VALUES"
        " ('prune.keep', 'completed', NULL), ('prune.short', 'failed', '1 day')"
    )
    try:
        prune_all(conn)
    finally:
        conn.execute("DELETE FROM asyncproc_retention")
    assert statuses(conn, "prune.keep") == {"completed": 2, "failed": 2}
    assert statuses(conn, "prune.short") == {}
    assert statuses(conn, "prune.default") == {"failed": 2}


def test_forever_keeps_everything(clean_db):
    seed(clean_db, "prune.forever", "completed", "400 days", 2)
    assert prune_all(clean_db, keep_completed=None) == 0
    assert statuses(clean_db, "prune.forever") == {"completed": 2}


def test_one_pruner_at_a_time(clean_db, database_url):
    seed(clean_db, "prune.one", "completed", "40 days", 2)
    with db.connect(database_url) as other:
        with other.transaction():
            other.execute("SELECT pg_advisory_xact_lock(hashtext('asyncproc_prune'))")
            assert clean_db.execute(PRUNE, {**KEEP, "batch": 10}).fetchone()["pruned"] is None
    assert prune_all(clean_db) == 2


def test_the_cli_prunes_and_dry_runs(clean_db, database_url, monkeypatch, capsys):
    seed(clean_db, "prune.cli", "completed", "3 days", 4)
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("ASYNCPROC_RETAIN_COMPLETED", "2d")
    assert cli.main(["prune", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"prune\.cli\tcompleted\tkeep 2 days\t4 due", out), out
    assert statuses(clean_db, "prune.cli") == {"completed": 4}
    assert cli.main(["prune"]) == 0
    assert "pruned 4 task(s)" in capsys.readouterr().out
    assert statuses(clean_db, "prune.cli") == {}


def test_the_workers_pruner_loop_prunes_and_stops_when_asked(clean_db, database_url):
    seed(clean_db, "prune.loop", "cancelled", "8 days", 25)
    seed(clean_db, "prune.loop", "pending", "8 days", 1)
    database = DatabaseSettings(url=database_url)
    settings = RetentionSettings(prune_batch_size=10, prune_interval_seconds=3600)

    async def run() -> None:
        pool = db.async_pool(database, "asyncproc-worker", 2)
        await pool.open(wait=True)
        stopping = asyncio.Event()
        # As worker/main.py runs it.
        health = LoopHealth("ledger upkeep")
        loop = asyncio.create_task(
            run_periodically(health, LedgerUpkeep(settings, pool, stopping).step, upkeep_period(settings), stopping)
        )
        try:
            async with asyncio.timeout(30):
                while statuses(clean_db, "prune.loop") != {"pending": 1}:
                    await asyncio.sleep(0.05)
            # Between prune passes, the loop still folds new changes in every few seconds.
            _insert_one(clean_db)
            async with asyncio.timeout(COMPACT_SECONDS * 3):
                while unfolded(clean_db):
                    await asyncio.sleep(0.1)
            stopping.set()
            async with asyncio.timeout(5):
                await loop
            assert health.failures_total == 0
        finally:
            loop.cancel()
            await pool.close()

    asyncio.run(run())


def test_a_long_prune_pass_keeps_folding_new_changes(clean_db, database_url):
    # A batch of one row at a time: the pass lasts about a minute unless stopped.
    seed(clean_db, "prune.long", "cancelled", "8 days", 2000)
    database = DatabaseSettings(url=database_url)
    settings = RetentionSettings(prune_batch_size=1)

    async def run() -> None:
        pool = db.async_pool(database, "asyncproc-worker", 2)
        await pool.open(wait=True)
        stopping = asyncio.Event()
        pruning = asyncio.create_task(retention.prune_pass(settings, pool, stopping))
        try:
            async with asyncio.timeout(30):
                while statuses(clean_db, "prune.long") == {"cancelled": 2000}:
                    await asyncio.sleep(0.05)
            _insert_one(clean_db)
            # Every reader of the counts adds up what is not folded yet; a pass
            # over millions of rows lasts minutes, so it must fold as it goes.
            async with asyncio.timeout(COMPACT_SECONDS * 3):
                while unfolded(clean_db, "prune.loop"):
                    await asyncio.sleep(0.1)
            assert not pruning.done()
            stopping.set()
            async with asyncio.timeout(10):
                report = await pruning
            assert 0 < report.pruned < 2000
        finally:
            pruning.cancel()
            await pool.close()

    asyncio.run(run())


def _insert_one(conn: psycopg.Connection) -> None:
    conn.execute("INSERT INTO tasks (operation) VALUES ('prune.loop')")


def unfolded(conn: psycopg.Connection, operation: str | None = None) -> int:
    return conn.execute(
        "SELECT count(*) AS n FROM asyncproc_ledger_events WHERE %(operation)s::text IS NULL OR operation = %(operation)s",
        {"operation": operation},
    ).fetchone()["n"]


def test_the_operator_role_reads_the_history_and_sets_overrides(clean_db, database_url):
    role = "asyncproc_test_retention_operator"
    clean_db.execute(f"DROP ROLE IF EXISTS {role}")
    clean_db.execute(f"CREATE ROLE {role} LOGIN")
    try:
        clean_db.execute(f"GRANT asyncproc_operator TO {role}")
        with psycopg.connect(make_conninfo(database_url, user=role), autocommit=True) as operator:
            for view in ("asyncproc_history", "asyncproc_operation_counts", "asyncproc_throughput_per_minute",
                         "asyncproc_throughput_per_hour", "asyncproc_status_counts"):
                operator.execute(f"SELECT * FROM {view}").fetchall()
            operator.execute("INSERT INTO asyncproc_retention (operation, status, keep) VALUES ('op.role', 'failed', NULL)")
            operator.execute("DELETE FROM asyncproc_retention WHERE operation = 'op.role'")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                operator.execute("SELECT asyncproc_recount()")
    finally:
        clean_db.execute(f"DROP OWNED BY {role}")
        clean_db.execute(f"DROP ROLE {role}")


def _docs_sql(heading: str) -> str:
    section = DOCS[DOCS.index(heading):]
    return re.search(r"```sql\n(.*?)```", section, re.DOTALL).group(1)


def test_the_documented_query_counts_last_months_failures_after_they_are_pruned(clean_db):
    conn = clean_db
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute(
            """
            INSERT INTO tasks (operation, status, attempts, created_at, scheduled_at, started_at, completed_at, updated_at)
            SELECT 'resize', 'failed', 3, t, t, t, t, t
            FROM generate_series(1, 7), LATERAL (SELECT date_trunc('month', now(), 'UTC') - interval '10 days') AS s(t)
            """
        )
    conn.execute("SELECT asyncproc_recount(with_history => true)")
    prune_all(conn, keep_failed=timedelta(days=1))
    conn.execute("SELECT asyncproc_compact()")
    assert statuses(conn, "resize") == {}
    assert conn.execute(_docs_sql("### How many `resize` tasks failed last month?")).fetchone()["failed"] == 7


@pytest.mark.parametrize("snippet", re.findall(r"```sql\n(.*?)```", DOCS, re.DOTALL))
def test_every_sql_example_in_the_docs_runs(clean_db, snippet):
    with clean_db.transaction(force_rollback=True):
        clean_db.execute(snippet)
