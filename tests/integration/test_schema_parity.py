"""The baseline and the current-state files build the schema that migrations
0001-0024 built, and upgrade a database those migrations made to the same
schema: pg_dump --schema-only cannot tell the two apart.

tests/legacy_migrations/ holds those 23 files as they were applied, so that
this stays true for every later change of migrations/.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from asyncproc import db, migrate
from asyncproc.config import INSTALLED_MIGRATIONS
from tests.support import PROJECT_ROOT, pg_client

MIGRATIONS = INSTALLED_MIGRATIONS
LEGACY = PROJECT_ROOT / "tests" / "legacy_migrations"


def _schema(url: str) -> str:
    """pg_dump --schema-only, without what differs between any two dumps.

    Each dump opens and closes with a \\restrict line holding a random key.
    A schema-only dump holds no rows, so the names of applied migrations
    (rows of asyncproc_migrations) cannot appear in it; nor does a
    schema-only dump print OIDs.
    """
    dumped = subprocess.run([pg_client(url, "pg_dump"), "--schema-only", "--no-password", url],
                            capture_output=True, text=True, timeout=120)
    assert dumped.returncode == 0, dumped.stderr
    return "".join(line for line in dumped.stdout.splitlines(keepends=True)
                   if not line.startswith(("\\restrict ", "\\unrestrict ")))


def _legacy_database(empty_database) -> str:
    """A database as migrations 0001-0024 left it, before the baseline existed."""
    url = empty_database()
    with db.connect(url) as conn:
        applied = migrate.apply_all(conn, LEGACY)
    assert applied == ["0001_procrastinate", *migrate.LEGACY_MIGRATIONS]
    return url


def _current_state_names() -> list[str]:
    return [current.name for current in migrate.discover_current_state(MIGRATIONS)]


def test_the_legacy_migrations_are_the_ones_the_baseline_replaced():
    legacy = [m.version for m in migrate.discover(LEGACY)]
    assert legacy == ["0001_procrastinate", *migrate.LEGACY_MIGRATIONS]
    # 0001 is not replaced: it loads Procrastinate's schema, the same file in both directories.
    assert (LEGACY / "0001_procrastinate.sql").read_text() == (MIGRATIONS / "0001_procrastinate.sql").read_text()
    assert migrate.BASELINE in [m.version for m in migrate.discover(MIGRATIONS)]


def test_a_fresh_database_and_an_upgraded_legacy_one_have_the_same_schema(empty_database):
    fresh = empty_database()
    with db.connect(fresh) as conn:
        migrate.apply_all(conn, MIGRATIONS)
    upgraded = _legacy_database(empty_database)
    with db.connect(upgraded) as conn:
        # The baseline is recorded, not run: its tables exist already; the migrations after it run.
        later = [m.version for m in migrate.discover(MIGRATIONS) if m.version > migrate.BASELINE]
        assert migrate.apply_all(conn, MIGRATIONS) == later + _current_state_names()
        recorded = {row["version"] for row in conn.execute("SELECT version FROM asyncproc_migrations")}
        assert migrate.BASELINE in recorded
    fresh_schema, upgraded_schema = _schema(fresh), _schema(upgraded)
    assert "CREATE TABLE public.tasks" in fresh_schema
    assert upgraded_schema == fresh_schema


def test_migrate_twice_applies_nothing_the_second_time(empty_database):
    url = empty_database()
    with db.connect(url) as conn:
        assert migrate.apply_all(conn, MIGRATIONS)
        before = _schema(url)
        assert migrate.apply_all(conn, MIGRATIONS) == []
    assert _schema(url) == before


def test_a_changed_current_state_file_is_applied_again_alone(empty_database, tmp_path):
    directory = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, directory, ignore=shutil.ignore_patterns("__pycache__", "__init__.py"))
    url = empty_database()
    with db.connect(url) as conn:
        migrate.apply_all(conn, directory)
        changed = directory / "current" / "80_operator_sql.sql"
        changed.write_text(changed.read_text().replace(
            "-- Which tasks have been running for longer than a threshold?",
            "-- Which tasks have been running for longer than a threshold? (edited)",
        ))
        assert migrate.apply_all(conn, directory) == ["current/80_operator_sql.sql"]
        assert migrate.apply_all(conn, directory) == []
        row = conn.execute(
            "SELECT checksum FROM asyncproc_current_state WHERE name = 'current/80_operator_sql.sql'"
        ).fetchone()
    assert row["checksum"] == migrate.CurrentStateFile(changed).checksum()


def test_a_changed_function_reaches_an_upgraded_database(empty_database, tmp_path):
    directory = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, directory, ignore=shutil.ignore_patterns("__pycache__", "__init__.py"))
    changed = directory / "current" / "80_operator_sql.sql"
    text = changed.read_text()
    assert text.count("    WHERE status = 'running' AND started_at < now() - older_than") == 1
    changed.write_text(text.replace(
        "    WHERE status = 'running' AND started_at < now() - older_than",
        "    WHERE status = 'running' AND started_at < now() - older_than AND true",
    ))
    url = _legacy_database(empty_database)
    with db.connect(url) as conn:
        migrate.apply_all(conn, directory)
        source = conn.execute("SELECT prosrc FROM pg_proc WHERE proname = 'asyncproc_stuck'").fetchone()["prosrc"]
    assert "older_than AND true" in source


def test_a_database_with_part_of_the_legacy_history_is_refused_and_left_alone(empty_database, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    for path in sorted(LEGACY.glob("*.sql"))[:5]:
        shutil.copy2(path, partial / path.name)
    url = empty_database()
    with db.connect(url) as conn:
        migrate.apply_all(conn, partial)
        before = _schema(url)
        with pytest.raises(migrate.MigrationError) as refused:
            migrate.apply_all(conn, MIGRATIONS)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"the database has 4 of the 22 migrations that {migrate.BASELINE} replaced (missing 0006_claim_on_fetch, ")
    assert message.endswith("run `asyncproc migrate` of the previous asyncproc release first")
    assert _schema(url) == before
