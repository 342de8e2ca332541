"""The limits and cron expressions the database holds: its CHECK constraints take what the CLI takes (0026)."""

from __future__ import annotations

import shutil
from typing import Iterator

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from asyncproc import cli, db, migrate
from asyncproc.config import INSTALLED_MIGRATIONS

# Roles belong to the whole server, which other test sessions share.
ROLE = "asyncproc_test_operator_limits"
LIMITS_CHECK = "asyncproc_operation_settings_limits"
CRON_CHECK = "asyncproc_schedules_cron_five_fields"
# Each refused by the CLI; through SQL they overflowed the claim, or meant "no limit".
BAD_RATES = ["1e-300", "1e308", "NaN", "Infinity"]


@pytest.fixture
def operator(clean_db, database_url) -> Iterator[psycopg.Connection]:
    """A psql session of a person given asyncproc_operator."""
    clean_db.execute("DELETE FROM asyncproc_operation_settings")
    clean_db.execute(f"DROP ROLE IF EXISTS {ROLE}")
    clean_db.execute(f"CREATE ROLE {ROLE} LOGIN")
    try:
        clean_db.execute(f"GRANT asyncproc_operator TO {ROLE}")
        with psycopg.connect(make_conninfo(database_url, user=ROLE), autocommit=True) as conn:
            yield conn
    finally:
        clean_db.execute("DELETE FROM asyncproc_operation_settings")
        clean_db.execute(f"DROP OWNED BY {ROLE}")
        clean_db.execute(f"DROP ROLE {ROLE}")


@pytest.mark.parametrize("rate", BAD_RATES)
def test_a_rate_the_cli_refuses_is_refused_by_an_operators_insert_and_update(operator, rate):
    with pytest.raises(psycopg.errors.CheckViolation, match=LIMITS_CHECK):
        operator.execute(
            "INSERT INTO asyncproc_operation_settings (operation, rate_per_second) VALUES ('bad', %s::double precision)", (rate,)
        )
    operator.execute("INSERT INTO asyncproc_operation_settings (operation, rate_per_second) VALUES ('bad', 1)")
    with pytest.raises(psycopg.errors.CheckViolation, match=LIMITS_CHECK):
        operator.execute("UPDATE asyncproc_operation_settings SET rate_per_second = %s::double precision WHERE operation = 'bad'", (rate,))
    assert operator.execute("SELECT rate_per_second FROM asyncproc_operation_settings").fetchall() == [(1.0,)]


@pytest.mark.parametrize(
    "flag, column, accepted, refused",
    [
        ("--max-running", "max_running", ["0", "1000000"], ["-1", "1000001", "99999999999"]),
        ("--rate", "rate_per_second", ["0.001", "1000000"], ["0.0009", "1000000.5", *BAD_RATES, "-inf"]),
        ("--burst", "burst", ["1", "1000000"], ["0", "1000001"]),
    ],
)
def test_the_cli_and_the_check_constraint_take_the_same_values(
    operator, database_url, monkeypatch, capsys, flag, column, accepted, refused
):
    monkeypatch.setenv("DATABASE_URL", database_url)
    operator.execute("INSERT INTO asyncproc_operation_settings (operation) VALUES ('by_sql')")
    set_by_sql = f"UPDATE asyncproc_operation_settings SET {column} = %s::double precision WHERE operation = 'by_sql'"
    for value in accepted:
        assert cli.main(["limits", "set", "compute", f"{flag}={value}"]) == 0
        operator.execute(set_by_sql, (value,))
    capsys.readouterr()
    for value in refused:
        assert cli.main(["limits", "set", "compute", f"{flag}={value}"]) == 1, value
        assert f"refused: {column} must be from" in capsys.readouterr().err
        with pytest.raises((psycopg.errors.CheckViolation, psycopg.errors.NumericValueOutOfRange)):
            operator.execute(set_by_sql, (value,))
    rows = operator.execute(f"SELECT operation, {column} FROM asyncproc_operation_settings ORDER BY operation").fetchall()
    assert [value for _, value in rows] == [float(accepted[-1])] * 2


def test_a_six_field_cron_is_refused_by_sql(operator):
    with pytest.raises(psycopg.errors.CheckViolation, match=CRON_CHECK):
        operator.execute("INSERT INTO asyncproc_schedules (name, cron, operation) VALUES ('secondly', '* * * * * *', 'compute')")
    operator.execute("INSERT INTO asyncproc_schedules (name, cron, operation) VALUES ('hourly', ' 0  * * * * ', 'compute')")
    operator.execute("INSERT INTO asyncproc_schedules (name, cron, operation) VALUES ('alias', '@daily', 'compute')")
    for cron in ("* * * * * *", "0 * * *", "@every", "@hourly 5"):
        with pytest.raises(psycopg.errors.CheckViolation, match=CRON_CHECK):
            operator.execute("UPDATE asyncproc_schedules SET cron = %s WHERE name = 'hourly'", (cron,))
    operator.execute("DELETE FROM asyncproc_schedules WHERE name IN ('hourly', 'alias')")


def test_existing_rows_that_break_the_checks_do_not_fail_the_migration(empty_database, tmp_path):
    """A database at 0025 holding what 0026 refuses migrates; those checks stay NOT VALID until the rows are fixed."""
    before = tmp_path / "migrations"
    shutil.copytree(INSTALLED_MIGRATIONS, before, ignore=shutil.ignore_patterns("__pycache__", "__init__.py", "0026_*"))
    url = empty_database()
    with db.connect(url) as conn:
        migrate.apply_all(conn, before)
        conn.execute("INSERT INTO asyncproc_operation_settings (operation, rate_per_second) VALUES ('old', 'NaN')")
        conn.execute("INSERT INTO asyncproc_schedules (name, cron, operation) VALUES ('old', '* * * * * *', 'compute')")
        assert migrate.apply_all(conn, INSTALLED_MIGRATIONS) == ["0026_limit_and_cron_checks"]
        validated = {
            row["conname"]: row["convalidated"]
            for row in conn.execute(
                "SELECT conname, convalidated FROM pg_constraint WHERE conname IN (%s, %s)", (LIMITS_CHECK, CRON_CHECK)
            )
        }
        assert validated == {LIMITS_CHECK: False, CRON_CHECK: False}
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("INSERT INTO asyncproc_operation_settings (operation, rate_per_second) VALUES ('new', 'NaN')")
        # As docs/limits-schedules-webhooks.md tells an operator to, once the rows are fixed.
        conn.execute("UPDATE asyncproc_operation_settings SET rate_per_second = 1 WHERE operation = 'old'")
        conn.execute("UPDATE asyncproc_schedules SET cron = '* * * * *' WHERE name = 'old'")
        conn.execute(f"ALTER TABLE asyncproc_operation_settings VALIDATE CONSTRAINT {LIMITS_CHECK}")
        conn.execute(f"ALTER TABLE asyncproc_schedules VALIDATE CONSTRAINT {CRON_CHECK}")


def test_a_fresh_database_has_the_checks_validated(conn):
    rows = conn.execute(
        "SELECT conname, convalidated FROM pg_constraint WHERE conname IN (%s, %s) ORDER BY conname", (LIMITS_CHECK, CRON_CHECK)
    ).fetchall()
    assert rows == [{"conname": LIMITS_CHECK, "convalidated": True}, {"conname": CRON_CHECK, "convalidated": True}]
