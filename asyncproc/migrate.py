"""The SQL migration runner.

Migrations are the numbered files in migrations/, forward-only. Each is applied
once, in its own transaction, and recorded in asyncproc_migrations. A
transaction-level advisory lock serialises runners, so `asyncproc migrate` is
safe to run twice or from two hosts at once.

Procrastinate's schema is installed by 0001 from the installed package, and
the Procrastinate schema version it applied is recorded with it. When a later
Procrastinate is installed, its own migrations from the recorded version up to
the installed one are applied first, each recorded the same way; a
Procrastinate release the code was not tested with is refused.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import procrastinate
import psycopg
from procrastinate.schema import SchemaManager

log = logging.getLogger(__name__)

# An arbitrary constant shared by every asyncproc migration runner.
ADVISORY_LOCK_KEY = 7_248_112_017
_FILE_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_PROCRASTINATE_DIRECTIVE = re.compile(r"^-- asyncproc:procrastinate-schema (\d+\.\d+)\s*$", re.MULTILINE)
# The Procrastinate releases (major.minor) this code was tested with; keep in
# step with the pin in setup.cfg. The claim and the bridge functions
# (migrations 0002, 0006, 0007) rely on their fetch and defer functions.
TESTED_PROCRASTINATE = ("3.10",)
# The Procrastinate schema of databases migrated before versions were recorded:
# 0001 was only ever applied from Procrastinate 3.10.
BASELINE_PROCRASTINATE_SCHEMA = "03.04.00_50"
_PROCRASTINATE_MIGRATION = re.compile(r"^(\d{2}\.\d{2}\.\d{2}_\d{2})_[a-z0-9_]+\.sql$")


class MigrationError(Exception):
    pass


@dataclass(frozen=True)
class Migration:
    version: str
    path: Path

    @property
    def installs_procrastinate(self) -> bool:
        return _PROCRASTINATE_DIRECTIVE.search(self.path.read_text()) is not None

    def sql(self) -> str:
        if self.installs_procrastinate:
            check_procrastinate_tested()
            return SchemaManager.get_schema()
        return self.path.read_text()


def check_procrastinate_tested(installed: str | None = None) -> None:
    installed = installed or metadata.version("procrastinate")
    if not any(installed == tested or installed.startswith(tested + ".") for tested in TESTED_PROCRASTINATE):
        raise MigrationError(
            f"procrastinate {installed} is installed, but asyncproc was tested with "
            f"{', '.join(v + '.x' for v in TESTED_PROCRASTINATE)} only: install a tested release"
        )


@dataclass(frozen=True)
class ProcrastinateMigration:
    """One of Procrastinate's own migration files, named like 03.04.00_50_what_it_does.sql."""

    schema_version: str
    path: Path


def procrastinate_migrations(directory: Path | None = None) -> list[ProcrastinateMigration]:
    directory = directory or Path(procrastinate.__file__).parent / "sql" / "migrations"
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _PROCRASTINATE_MIGRATION.match(path.name)
        if match:
            found.append(ProcrastinateMigration(match.group(1), path))
    return found


def installed_procrastinate_schema() -> str:
    """The schema version that the installed Procrastinate's schema.sql corresponds to."""
    return procrastinate_migrations()[-1].schema_version


def discover(directory: Path) -> list[Migration]:
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if not match:
            raise MigrationError(f"unexpected file in {directory}: {path.name}")
        found.append(Migration(version=path.stem, path=path))
    # Never a success that applied nothing: an install without its SQL, or a
    # mistyped ASYNCPROC_MIGRATIONS_DIR, would leave a database without a schema.
    if not found:
        reason = "no 0001_name.sql files" if directory.is_dir() else "no such directory"
        raise MigrationError(f"no migrations in {directory} ({reason}): check ASYNCPROC_MIGRATIONS_DIR or the asyncproc install")
    if len({m.version[:4] for m in found}) != len(found):
        raise MigrationError(f"two migrations share a number in {directory}")
    return found


def _applied(conn: psycopg.Connection) -> set[str]:
    rows = conn.execute("SELECT version FROM asyncproc_migrations").fetchall()
    return {row["version"] for row in rows}


def recorded_procrastinate_schema(conn: psycopg.Connection) -> str | None:
    """The Procrastinate schema version the database holds, or None before 0001."""
    row = conn.execute("SELECT max(procrastinate_schema) AS version FROM asyncproc_migrations").fetchone()
    return row["version"]


def _record(conn: psycopg.Connection, version: str, procrastinate_schema: str | None) -> None:
    conn.execute(
        "INSERT INTO asyncproc_migrations (version, procrastinate_schema) VALUES (%s, %s)",
        (version, procrastinate_schema),
    )


def _upgrade_procrastinate(conn: psycopg.Connection) -> list[str]:
    """Apply Procrastinate's migrations between the recorded schema and the installed one."""
    applied_now = []
    for step in procrastinate_migrations():
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_KEY,))
            recorded = recorded_procrastinate_schema(conn)
            if recorded is None or step.schema_version <= recorded:
                continue
            check_procrastinate_tested()
            version = f"procrastinate-{step.path.stem}"
            log.info("applying Procrastinate migration %s", step.path.name)
            conn.execute(step.path.read_text().encode())
            _record(conn, version, step.schema_version)
            applied_now.append(version)
    return applied_now


def apply_all(conn: psycopg.Connection, directory: Path) -> list[str]:
    """Apply every pending migration; return the versions applied now."""
    migrations = discover(directory)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_KEY,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS asyncproc_migrations ("
            " version text PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        # Databases migrated before schema versions were recorded hold the baseline.
        conn.execute("ALTER TABLE asyncproc_migrations ADD COLUMN IF NOT EXISTS procrastinate_schema text")
        for migration in migrations:
            if migration.installs_procrastinate:
                conn.execute(
                    "UPDATE asyncproc_migrations SET procrastinate_schema = %s"
                    " WHERE version = %s AND procrastinate_schema IS NULL",
                    (BASELINE_PROCRASTINATE_SCHEMA, migration.version),
                )
    # Our later migrations are written against the newest tested schema.
    applied_now = _upgrade_procrastinate(conn)
    for migration in migrations:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_KEY,))
            if migration.version in _applied(conn):
                continue
            log.info("applying migration %s", migration.version)
            conn.execute(migration.sql().encode())
            schema = installed_procrastinate_schema() if migration.installs_procrastinate else None
            _record(conn, migration.version, schema)
            applied_now.append(migration.version)
    return applied_now
