"""The SQL migration runner.

The schema comes in two kinds of file, because it holds two kinds of object:

* Versioned migrations, the numbered files in migrations/ (0001_name.sql):
  what must run once and cannot simply be run again, that is tables, columns,
  indexes, constraints, seed rows and moves of data. Each is applied once, in
  its own transaction, and recorded in asyncproc_migrations. 0025_baseline
  creates every table as it stands today; later changes are new numbers.
* Current-state files, migrations/current/NN_name.sql: what can be replaced
  whole, that is functions (CREATE OR REPLACE FUNCTION), views (CREATE OR
  REPLACE VIEW), triggers (DROP TRIGGER IF EXISTS, then CREATE TRIGGER) and the
  operator role's grants. Each file holds the current definition of its
  objects, so a changed function is a diff of the lines that changed, in the
  file where it has always been, and its comments can be corrected. After the
  versioned migrations, each file whose checksum differs from the one recorded
  in asyncproc_current_state is applied again, in name order (NN sets an order
  in which a file may use what a lower-numbered one defines), each in its own
  transaction. This is Flyway's "repeatable migration".

Rather than one schema file diffed against the database by a tool: a diff of
two schemas cannot tell a renamed column from a dropped one, nor move data,
and would be a dependency of its own; the versioned files say exactly what an
upgrade does to the rows, and the current-state files are plain SQL that runs
again unchanged.

A transaction-level advisory lock serialises runners, so `asyncproc migrate`
is safe to run twice or from two hosts at once.

0025_baseline replaces 0002-0024, which are kept as history in
tests/legacy_migrations/. A database that recorded all of them already has
what the baseline creates: the baseline is recorded without running, and the
current-state files bring its functions, views and triggers up to date. A
database that recorded only some of them is refused: it must first be brought
to 0024 by the previous release's `asyncproc migrate`.

Procrastinate's schema is installed by 0001 from the installed package, and
the Procrastinate schema version it applied is recorded with it. When a later
Procrastinate is installed, its own migrations from the recorded version up to
the installed one are applied first, each recorded the same way; a
Procrastinate release the code was not tested with is refused.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import procrastinate
import psycopg
from procrastinate.schema import SchemaManager
from psycopg.rows import tuple_row

from asyncproc import db

log = logging.getLogger(__name__)

# An arbitrary constant shared by every asyncproc migration runner.
ADVISORY_LOCK_KEY = 7_248_112_017
_FILE_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_CURRENT_FILE_NAME = re.compile(r"^\d{2}_[a-z0-9_]+\.sql$")
CURRENT_STATE_DIR = "current"
_PROCRASTINATE_DIRECTIVE = re.compile(r"^-- asyncproc:procrastinate-schema (\d+\.\d+)\s*$", re.MULTILINE)
# The Procrastinate releases (major.minor) this code was tested with; keep in
# step with the pin in setup.cfg. The claim and the bridge functions
# (migrations/current/20_ and 30_procrastinate_*) rely on its fetch and defer functions.
TESTED_PROCRASTINATE = ("3.10",)
# The Procrastinate schema of databases migrated before versions were recorded:
# 0001 was only ever applied from Procrastinate 3.10.
BASELINE_PROCRASTINATE_SCHEMA = "03.04.00_50"
_PROCRASTINATE_MIGRATION = re.compile(r"^(\d{2}\.\d{2}\.\d{2}_\d{2})_[a-z0-9_]+\.sql$")
# The versioned migration that replaced LEGACY_MIGRATIONS, and those: a database
# that recorded all of them holds everything the baseline creates.
BASELINE = "0025_baseline"
LEGACY_MIGRATIONS = (
    "0002_procrastinate_bridge", "0003_tasks", "0004_operations_sql", "0005_api_keys",
    "0006_claim_on_fetch", "0007_dispatch_lock_order", "0008_task_timeout", "0009_api_limits",
    "0010_ledger_scale", "0011_schedules_webhooks", "0013_dashboard", "0014_worker_complete_many",
    "0015_fair_fetch", "0016_worker_complete_jobs", "0017_fetch_many", "0018_tasks_running_idx",
    "0019_jobs_worker_idx", "0020_sweep_stale_statistics", "0021_time_ordered_task_ids",
    "0022_fetch_generic_plans", "0023_sweep_own_jobs_only", "0024_leases_and_attempts",
)


class MigrationError(Exception):
    pass


# The schema generation this release's code is written for, which
# migrations/current/05_schema_generation.sql must serve. A release whose code
# relies on a schema change of its own raises it and that file's `generation`
# together (docs/production.md, "Upgrading").
CODE_GENERATION = 1


def check_schema_serves_this_code(conn: psycopg.Connection) -> None:
    """MigrationError, one line saying what to run, when the database's schema does not serve this release's code."""
    try:
        with conn.cursor(row_factory=tuple_row) as cursor:
            generation, oldest = cursor.execute(db.query("schema_generation")).fetchone()
    except psycopg.errors.UndefinedFunction:
        raise MigrationError(
            "the database records no schema generation (a release before it, or no `asyncproc migrate` yet):"
            " run this release's `asyncproc migrate` first"
        ) from None
    if generation < CODE_GENERATION:
        raise MigrationError(
            f"the database's schema is generation {generation}, older than this release's code (generation"
            f" {CODE_GENERATION}): run this release's `asyncproc migrate` first"
        )
    if oldest > CODE_GENERATION:
        raise MigrationError(
            f"the database was migrated by a newer asyncproc (schema generation {generation}), which no longer serves"
            f" this release's code (generation {CODE_GENERATION}; it serves {oldest} and later): run the newer release"
        )


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


@dataclass(frozen=True)
class CurrentStateFile:
    """One file of migrations/current/: applied again whenever its checksum changes."""

    path: Path

    @property
    def name(self) -> str:
        return f"{CURRENT_STATE_DIR}/{self.path.name}"

    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


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


def discover_current_state(directory: Path) -> list[CurrentStateFile]:
    """The current-state files under directory/current/, in the order they are applied; none is fine."""
    found = []
    for path in sorted((directory / CURRENT_STATE_DIR).glob("*.sql")):
        if not _CURRENT_FILE_NAME.match(path.name):
            raise MigrationError(f"unexpected file in {path.parent}: {path.name}")
        found.append(CurrentStateFile(path))
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


def _adopt_legacy_history(conn: psycopg.Connection, migrations: list[Migration]) -> None:
    """Record the baseline as applied where 0002-0024 were, and refuse a database that has only some of them."""
    if BASELINE not in {m.version for m in migrations}:
        return
    applied = _applied(conn)
    legacy = [version for version in LEGACY_MIGRATIONS if version in applied]
    if not legacy or BASELINE in applied:
        return
    missing = [version for version in LEGACY_MIGRATIONS if version not in applied]
    if missing:
        raise MigrationError(
            f"the database has {len(legacy)} of the {len(LEGACY_MIGRATIONS)} migrations that {BASELINE} replaced"
            f" (missing {', '.join(missing)}): run `asyncproc migrate` of the previous asyncproc release first"
        )
    log.info("recording %s as applied: the database holds migrations 0002-0024", BASELINE)
    _record(conn, BASELINE, None)


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


def _apply_current_state(conn: psycopg.Connection, files: list[CurrentStateFile]) -> list[str]:
    """Apply each current-state file whose checksum is not the one recorded; return their names."""
    applied_now = []
    for current in files:
        checksum = current.checksum()
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_KEY,))
            row = conn.execute(
                "SELECT checksum FROM asyncproc_current_state WHERE name = %s", (current.name,)
            ).fetchone()
            if row is not None and row["checksum"] == checksum:
                continue
            log.info("applying %s", current.name)
            conn.execute(current.path.read_bytes())
            conn.execute(
                "INSERT INTO asyncproc_current_state (name, checksum) VALUES (%s, %s)"
                " ON CONFLICT (name) DO UPDATE SET checksum = EXCLUDED.checksum, applied_at = now()",
                (current.name, checksum),
            )
            applied_now.append(current.name)
    return applied_now


def apply_all(conn: psycopg.Connection, directory: Path) -> list[str]:
    """Apply every pending migration, then every changed current-state file; return what was applied now."""
    migrations = discover(directory)
    current_state = discover_current_state(directory)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_KEY,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS asyncproc_migrations ("
            " version text PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        # Databases migrated before schema versions were recorded hold the baseline.
        conn.execute("ALTER TABLE asyncproc_migrations ADD COLUMN IF NOT EXISTS procrastinate_schema text")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS asyncproc_current_state ("
            " name text PRIMARY KEY,"
            " checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for migration in migrations:
            if migration.installs_procrastinate:
                conn.execute(
                    "UPDATE asyncproc_migrations SET procrastinate_schema = %s"
                    " WHERE version = %s AND procrastinate_schema IS NULL",
                    (BASELINE_PROCRASTINATE_SCHEMA, migration.version),
                )
        _adopt_legacy_history(conn, migrations)
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
    return applied_now + _apply_current_state(conn, current_state)
