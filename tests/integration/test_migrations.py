"""Migrations applied to an empty database, once, safely in parallel."""

from __future__ import annotations

import re
import threading
from importlib import metadata
from pathlib import Path

import pytest

from asyncproc import db, migrate, service
from asyncproc.config import Settings

MIGRATIONS = Settings().migrations_dir


def test_all_migrations_build_the_schema_on_an_empty_database(empty_database):
    url = empty_database()
    with db.connect(url) as conn:
        applied = migrate.apply_all(conn, MIGRATIONS)
        assert applied == [m.version for m in migrate.discover(MIGRATIONS)]
        tables = {
            row["tablename"]
            for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
        assert {"tasks", "procrastinate_jobs", "asyncproc_migrations"} <= tables
        functions = {row["proname"] for row in conn.execute("SELECT proname FROM pg_proc")}
        assert {"asyncproc_defer_jobs", "asyncproc_sweep", "asyncproc_delete_queued_job"} <= functions
        recorded = [row["version"] for row in conn.execute("SELECT version FROM asyncproc_migrations ORDER BY version")]
        assert recorded == applied
        assert migrate.apply_all(conn, MIGRATIONS) == []


def test_concurrent_runners_apply_each_migration_once(empty_database):
    url = empty_database()
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with db.connect(url) as conn:
                results.append(migrate.apply_all(conn, MIGRATIONS))
        except BaseException as exc:  # reported below, so the test fails with it
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    everything = sorted(version for result in results for version in result)
    assert everything == [m.version for m in migrate.discover(MIGRATIONS)]


def test_procrastinate_version_is_the_pinned_one():
    # migrations/0001 loads this version's schema and 0002 wraps its v1 functions.
    assert metadata.version("procrastinate").startswith("3.10.")


def test_an_untested_procrastinate_release_is_refused():
    with pytest.raises(migrate.MigrationError, match="procrastinate 3.11.0 is installed, but asyncproc was tested with 3.10.x only"):
        migrate.check_procrastinate_tested("3.11.0")
    migrate.check_procrastinate_tested("3.10.7")


def test_the_tested_releases_match_the_pin_in_setup_cfg():
    pin = re.search(r"procrastinate>=(\d+\.\d+),<", (Path(__file__).parents[2] / "setup.cfg").read_text()).group(1)
    assert migrate.TESTED_PROCRASTINATE == (pin,)


def test_api_default_max_attempts_matches_the_column_default(conn):
    row = conn.execute(
        "SELECT column_default FROM information_schema.columns"
        " WHERE table_name = 'tasks' AND column_name = 'max_attempts'"
    ).fetchone()
    assert row["column_default"] == str(service.DEFAULT_MAX_ATTEMPTS)
