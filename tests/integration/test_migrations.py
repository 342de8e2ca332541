"""Migrations applied to an empty database, once, safely in parallel."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from asyncproc import db, migrate
from asyncproc.config import Settings
from tests.support import bare_env

MIGRATIONS = Settings().migrations_dir


def _everything() -> list[str]:
    """What apply_all applies to an empty database: the versioned migrations, then the current-state files."""
    return [m.version for m in migrate.discover(MIGRATIONS)] + [f.name for f in migrate.discover_current_state(MIGRATIONS)]


def test_all_migrations_build_the_schema_on_an_empty_database(empty_database):
    url = empty_database()
    with db.connect(url) as conn:
        applied = migrate.apply_all(conn, MIGRATIONS)
        assert applied == _everything()
        assert any(name.startswith("current/") for name in applied)
        tables = {
            row["tablename"]
            for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
        assert {"tasks", "procrastinate_jobs", "asyncproc_migrations"} <= tables
        functions = {row["proname"] for row in conn.execute("SELECT proname FROM pg_proc")}
        assert {"asyncproc_defer_jobs", "asyncproc_sweep", "asyncproc_delete_queued_job"} <= functions
        recorded = [row["version"] for row in conn.execute("SELECT version FROM asyncproc_migrations ORDER BY version")]
        assert recorded == [m.version for m in migrate.discover(MIGRATIONS)]
        current = [row["name"] for row in conn.execute("SELECT name FROM asyncproc_current_state ORDER BY name")]
        assert current == [f.name for f in migrate.discover_current_state(MIGRATIONS)]
        assert migrate.apply_all(conn, MIGRATIONS) == []


def test_concurrent_runners_apply_each_migration_and_current_state_file_once(empty_database):
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
    assert everything == sorted(_everything())


def test_procrastinate_version_is_the_pinned_one():
    # migrations/0001 loads this version's schema and migrations/current/20_procrastinate_bridge.sql
    # wraps its versioned functions.
    assert metadata.version("procrastinate").startswith("3.10.")


def test_an_untested_procrastinate_release_is_refused():
    with pytest.raises(migrate.MigrationError, match="procrastinate 3.11.0 is installed, but asyncproc was tested with 3.10.x only"):
        migrate.check_procrastinate_tested("3.11.0")
    migrate.check_procrastinate_tested("3.10.7")


def test_the_tested_releases_match_the_pin_in_setup_cfg():
    pin = re.search(r"procrastinate>=(\d+\.\d+),<", (Path(__file__).parents[2] / "setup.cfg").read_text()).group(1)
    assert migrate.TESTED_PROCRASTINATE == (pin,)


def test_migrations_record_the_procrastinate_schema_they_applied(conn):
    assert migrate.recorded_procrastinate_schema(conn) == migrate.installed_procrastinate_schema()
    row = conn.execute(
        "SELECT procrastinate_schema FROM asyncproc_migrations WHERE version = '0001_procrastinate'"
    ).fetchone()
    assert row["procrastinate_schema"] == migrate.installed_procrastinate_schema()


PREVIOUS_PROCRASTINATE = "3.3.0"  # the last release before the schema that 3.10 installs (03.04.00)


def _previous_procrastinate_schema(directory: Path) -> str:
    """schema.sql of an older Procrastinate release, read from its wheel on PyPI (never vendored here)."""
    fetched = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(directory),
         f"procrastinate=={PREVIOUS_PROCRASTINATE}"],
        capture_output=True, text=True, timeout=120,
    )
    wheels = list(directory.glob("procrastinate-*.whl"))
    if fetched.returncode != 0 or not wheels:
        pytest.skip(f"needs PyPI to fetch procrastinate {PREVIOUS_PROCRASTINATE}: {fetched.stderr.strip()[-300:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        return wheel.read("procrastinate/sql/schema.sql").decode()


def _procrastinate_objects(conn) -> dict[str, list]:
    """Procrastinate's schema as the catalogue sees it: columns, functions, indexes, triggers, enum values."""
    return {
        "columns": conn.execute(
            "SELECT table_name, column_name, data_type, is_nullable, column_default FROM information_schema.columns"
            " WHERE table_schema = 'public' AND table_name LIKE 'procrastinate%' ORDER BY 1, 2"
        ).fetchall(),
        "functions": conn.execute(
            "SELECT proname, pg_get_function_identity_arguments(oid) AS args, md5(regexp_replace(prosrc, '\\s+', ' ', 'g')) AS body"
            " FROM pg_proc WHERE proname LIKE 'procrastinate%' ORDER BY 1, 2"
        ).fetchall(),
        "indexes": conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename LIKE 'procrastinate%' ORDER BY 1"
        ).fetchall(),
        "triggers": conn.execute(
            "SELECT tgname FROM pg_trigger WHERE tgname LIKE 'procrastinate%' AND NOT tgisinternal ORDER BY 1"
        ).fetchall(),
        "enums": conn.execute(
            "SELECT t.typname, e.enumlabel FROM pg_enum AS e JOIN pg_type AS t ON t.oid = e.enumtypid"
            " WHERE t.typname LIKE 'procrastinate%' ORDER BY 1, 2"
        ).fetchall(),
    }


def test_a_database_at_the_previous_procrastinate_schema_is_upgraded_to_the_installed_one(empty_database, tmp_path):
    old_schema = _previous_procrastinate_schema(tmp_path)
    upgraded_url, fresh_url = empty_database(), empty_database()
    with db.connect(upgraded_url) as conn:
        # As asyncproc would have left a database when it pinned that release: 0001 applied and recorded.
        conn.execute(old_schema.encode())
        conn.execute(
            "CREATE TABLE asyncproc_migrations (version text PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now(), procrastinate_schema text)"
        )
        conn.execute("INSERT INTO asyncproc_migrations (version, procrastinate_schema) VALUES ('0001_procrastinate', '03.03.00_01')")
        applied = migrate.apply_all(conn, MIGRATIONS)
        upgrades = [version for version in applied if version.startswith("procrastinate-")]
        assert upgrades == [f"procrastinate-{step.path.stem}" for step in migrate.procrastinate_migrations()
                            if step.schema_version > "03.03.00_01"]
        assert upgrades, "the previous release's schema should need an upgrade"
        assert applied[len(upgrades):] == _everything()[1:]
        assert migrate.recorded_procrastinate_schema(conn) == migrate.installed_procrastinate_schema()
        assert migrate.apply_all(conn, MIGRATIONS) == []
        upgraded = _procrastinate_objects(conn)
    with db.connect(fresh_url) as conn:
        migrate.apply_all(conn, MIGRATIONS)
        fresh = _procrastinate_objects(conn)
    for kind in fresh:
        assert upgraded[kind] == fresh[kind], kind


@pytest.mark.parametrize("where", ["empty", "missing"])
def test_migrate_without_migrations_fails_in_one_line_and_touches_nothing(empty_database, tmp_path, where):
    directory = tmp_path if where == "empty" else tmp_path / "missing"
    url = empty_database()
    result = subprocess.run(
        [sys.executable, "-m", "asyncproc.cli", "migrate"],
        env=bare_env(DATABASE_URL=url, ASYNCPROC_MIGRATIONS_DIR=str(directory)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result
    assert result.stderr.startswith(f"asyncproc: no migrations in {directory} "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    with db.connect(url) as conn:
        assert conn.execute("SELECT to_regclass('asyncproc_migrations') AS t").fetchone()["t"] is None
