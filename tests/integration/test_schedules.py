"""Schedules: occurrence arithmetic, the scheduler's tick against PostgreSQL, and the CLI."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from asyncproc import cli, db
from asyncproc.config import DatabaseSettings
from asyncproc.schedules import ScheduleError, Timing, due_occurrence
from worker.scheduler import enqueue_due

UTC = timezone.utc
KWARGS = db.connect_kwargs(DatabaseSettings(), "asyncproc-worker")


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_every_seconds_occurrences_are_counted_from_the_epoch():
    timing = Timing(every_seconds=60)
    assert timing.latest(at("2026-01-01T10:00:59")) == at("2026-01-01T10:00:00")
    assert timing.after(at("2026-01-01T10:00:00")) == at("2026-01-01T10:01:00")


def test_cron_occurrences_include_now_itself():
    timing = Timing(cron="0 * * * *")
    assert timing.latest(at("2026-01-01T10:00:00")) == at("2026-01-01T10:00:00")
    assert timing.latest(at("2026-01-01T10:59:59")) == at("2026-01-01T10:00:00")
    assert timing.after(at("2026-01-01T10:00:00")) == at("2026-01-01T11:00:00")


@pytest.mark.parametrize("cron", ["61 * * * *", "* * * * * *", "every minute", "@sometimes", "0 0 30 2 *", "0 0 31 4 *"])
def test_bad_cron_expressions_are_refused(cron):
    with pytest.raises(ScheduleError):
        Timing(cron=cron).check()


def test_downtime_gives_at_most_one_run():
    hourly = Timing(cron="0 * * * *")
    now = at("2026-01-01T10:30:00")
    missed_since = at("2026-01-01T02:00:00")
    assert due_occurrence(hourly, missed_since, now, "one", 60) == at("2026-01-01T10:00:00")
    assert due_occurrence(hourly, missed_since, now, "skip", 60) is None
    # The occurrence that just fell is no catch-up: it runs either way.
    assert due_occurrence(hourly, missed_since, at("2026-01-01T10:00:20"), "skip", 60) == at("2026-01-01T10:00:00")


def tick(database_url: str, misfire_seconds: float = 60) -> int:
    async def once() -> int:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True, **KWARGS) as conn:
            return await enqueue_due(conn, misfire_seconds)

    return asyncio.run(once())


def tick_concurrently(database_url: str, workers: int) -> int:
    async def all_at_once() -> int:
        connections = [
            await psycopg.AsyncConnection.connect(database_url, autocommit=True, **KWARGS)
            for _ in range(workers)
        ]
        try:
            return sum(await asyncio.gather(*(enqueue_due(conn, 60) for conn in connections)))
        finally:
            for conn in connections:
                await conn.close()

    return asyncio.run(all_at_once())


@pytest.fixture
def schedules(clean_db):
    """No schedules before, and none left behind for other tests' workers to run."""
    clean_db.execute("DELETE FROM asyncproc_schedules")
    yield clean_db
    clean_db.execute("DELETE FROM asyncproc_schedules")


def scheduled_tasks(conn, name: str) -> list[dict]:
    return conn.execute(
        "SELECT r.scheduled_for, t.operation, t.payload, t.status FROM asyncproc_schedule_runs r "
        "JOIN tasks t USING (task_id) WHERE r.schedule_name = %s ORDER BY r.scheduled_for",
        (name,),
    ).fetchall()


def test_a_new_schedule_first_computes_its_next_run(schedules, database_url):
    schedules.execute(
        "INSERT INTO asyncproc_schedules (name, every_seconds, operation, payload) VALUES ('fresh', 3600, 'compute', '{\"n\": 2}')"
    )
    assert tick(database_url) == 0
    row = schedules.execute("SELECT next_run_at, now() AS now FROM asyncproc_schedules WHERE name = 'fresh'").fetchone()
    assert row["now"] < row["next_run_at"] <= row["now"] + timedelta(hours=1)


def test_a_due_occurrence_is_enqueued_once_by_many_workers_at_once(schedules, database_url):
    schedules.execute(
        "INSERT INTO asyncproc_schedules (name, every_seconds, operation, payload, next_run_at) "
        "VALUES ('race', 3600, 'compute', '{\"n\": 5}', now() - interval '1 second')"
    )
    assert tick_concurrently(database_url, workers=6) == 1
    assert tick(database_url) == 0
    runs = scheduled_tasks(schedules, "race")
    assert len(runs) == 1 and runs[0]["operation"] == "compute" and runs[0]["payload"] == {"n": 5}


def test_an_occurrence_already_enqueued_is_never_enqueued_again(schedules, database_url):
    """The unique (name, time) row holds even when next_run_at is set back by hand."""
    schedules.execute(
        "INSERT INTO asyncproc_schedules (name, every_seconds, operation, next_run_at) "
        "VALUES ('again', 3600, 'compute', now() - interval '1 second')"
    )
    assert tick(database_url) == 1
    schedules.execute(
        "UPDATE asyncproc_schedules SET next_run_at = (SELECT scheduled_for FROM asyncproc_schedule_runs "
        "WHERE schedule_name = 'again') WHERE name = 'again'"
    )
    assert tick(database_url) == 0
    assert len(scheduled_tasks(schedules, "again")) == 1


@pytest.mark.parametrize("catch_up,expected", [("skip", 0), ("one", 1)])
def test_no_burst_after_downtime(schedules, database_url, catch_up, expected):
    # Yearly, and missed for five years: at most the latest run, and only when asked for.
    schedules.execute(
        "INSERT INTO asyncproc_schedules (name, cron, operation, catch_up, next_run_at) "
        "VALUES ('yearly', '0 0 1 1 *', 'compute', %s, now() - interval '5 years')",
        (catch_up,),
    )
    assert tick(database_url) == expected
    runs = scheduled_tasks(schedules, "yearly")
    assert len(runs) == expected
    if runs:
        assert runs[0]["scheduled_for"] == datetime(datetime.now(UTC).year, 1, 1, tzinfo=UTC)
    row = schedules.execute("SELECT next_run_at FROM asyncproc_schedules WHERE name = 'yearly'").fetchone()
    assert row["next_run_at"] > datetime.now(UTC)


def test_a_disabled_schedule_enqueues_nothing_and_an_edit_starts_afresh(schedules, database_url):
    schedules.execute(
        "INSERT INTO asyncproc_schedules (name, every_seconds, operation, enabled, next_run_at) "
        "VALUES ('off', 1, 'compute', false, now() - interval '1 second')"
    )
    assert tick(database_url) == 0
    schedules.execute("UPDATE asyncproc_schedules SET enabled = true WHERE name = 'off'")
    assert schedules.execute("SELECT next_run_at FROM asyncproc_schedules WHERE name = 'off'").fetchone()["next_run_at"] is None


@pytest.mark.parametrize("cron, error", [("61 * * * *", "61 * * * *"), ("0 0 30 2 *", "never fires")])
def test_a_bad_cron_written_with_sql_is_reported_not_fatal(schedules, database_url, cron, error):
    """Looked at again a minute later, and the other due schedules still run."""
    schedules.execute(
        "INSERT INTO asyncproc_schedules (name, cron, every_seconds, operation, next_run_at) "
        "VALUES ('broken', %s, NULL, 'compute', now() - interval '1 second'),"
        " ('fine', NULL, 3600, 'compute', now() - interval '1 second')",
        (cron,),
    )
    assert tick(database_url) == 1
    row = schedules.execute("SELECT last_error, next_run_at FROM asyncproc_schedules WHERE name = 'broken'").fetchone()
    assert error in row["last_error"] and row["next_run_at"] > datetime.now(UTC) + timedelta(seconds=30)
    assert tick(database_url) == 0
    assert len(scheduled_tasks(schedules, "fine")) == 1


def test_the_cli_refuses_a_cron_that_never_fires(schedules, database_url, monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", database_url)
    assert cli.main(["schedules", "add", "never", "compute", "--cron", "0 0 30 2 *"]) == 1
    assert "'0 0 30 2 *' never fires" in capsys.readouterr().err
    assert schedules.execute("SELECT count(*) AS n FROM asyncproc_schedules").fetchone()["n"] == 0


def test_the_cli_adds_lists_and_removes_schedules(schedules, database_url, monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", database_url)
    assert cli.main(["schedules", "add", "nightly", "compute", "--cron", "0 3 * * *", "--data", '{"n": 10}']) == 0
    assert cli.main(["schedules", "add", "often", "sleep", "--every", "30", "--catch-up", "one"]) == 0
    assert cli.main(["schedules", "add", "bad", "compute", "--cron", "61 * * * *"]) == 1
    assert cli.main(["schedules", "add", "nightly", "compute", "--every", "5"]) == 1
    assert cli.main(["schedules", "add", "unknown", "no_such_operation", "--every", "5"]) == 1
    capsys.readouterr()
    assert cli.main(["schedules", "list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[:3] for line in listed] == [
        ["nightly", "cron 0 3 * * *", "compute"],
        ["often", "every 30 s", "sleep"],
    ]
    assert cli.main(["schedules", "remove", "often"]) == 0
    assert cli.main(["schedules", "remove", "often"]) == 1
    row = schedules.execute("SELECT payload, catch_up FROM asyncproc_schedules WHERE name = 'nightly'").fetchone()
    assert row == {"payload": {"n": 10}, "catch_up": "skip"}


def test_the_operator_role_manages_schedules_limits_and_cancels_tasks_with_callbacks(schedules, database_url):
    """0011's tables are granted to asyncproc_operator, and its triggers run as their owner."""
    from psycopg.conninfo import make_conninfo

    role = "asyncproc_test_operator_16"
    schedules.execute(f"DROP ROLE IF EXISTS {role}")
    schedules.execute(f"CREATE ROLE {role} LOGIN")
    try:
        schedules.execute(f"GRANT asyncproc_operator TO {role}")
        with psycopg.connect(make_conninfo(database_url, user=role), autocommit=True) as operator:
            operator.execute("INSERT INTO asyncproc_schedules (name, every_seconds, operation) VALUES ('op', 60, 'compute')")
            operator.execute("INSERT INTO asyncproc_operation_settings (operation, paused) VALUES ('compute', true)")
            operator.execute("UPDATE asyncproc_operation_settings SET paused = false WHERE operation = 'compute'")
            operator.execute("DELETE FROM asyncproc_operation_settings WHERE operation = 'compute'")
            task_id = operator.execute(
                "INSERT INTO tasks (operation, callback_url) VALUES ('compute', 'https://hooks.example.com/x') RETURNING task_id"
            ).fetchone()[0]
            operator.execute("SELECT * FROM asyncproc_cancel(%s)", (task_id,))
            (queued,) = operator.execute("SELECT task->>'status' FROM asyncproc_callbacks WHERE task_id = %s", (task_id,)).fetchone()
        assert queued == "cancelled"
    finally:
        schedules.execute("DELETE FROM asyncproc_operation_settings")
        schedules.execute(f"DROP OWNED BY {role}")
        schedules.execute(f"DROP ROLE {role}")


def test_a_scheduled_task_gets_a_time_ordered_id(schedules, database_url):
    schedules.execute(
        "INSERT INTO asyncproc_schedules (name, every_seconds, operation, payload, next_run_at) "
        "VALUES ('stamped', 3600, 'compute', '{\"n\": 1}', now() - interval '1 second')"
    )
    assert tick(database_url) == 1
    run = schedules.execute(
        "SELECT task_id, floor(extract(epoch FROM now()) * 1000)::bigint AS ms FROM asyncproc_schedule_runs"
        " WHERE schedule_name = 'stamped'"
    ).fetchone()
    assert run["task_id"].version == 7
    assert abs((run["task_id"].int >> 80) - run["ms"]) < 60_000
