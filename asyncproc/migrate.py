"""The SQL migration runner.

Migrations are the numbered files in migrations/, forward-only. Each is applied
once, in its own transaction, and recorded in asyncproc_migrations. A
transaction-level advisory lock serialises runners, so `asyncproc migrate` is
safe to run twice or from two hosts at once.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import psycopg
from procrastinate.schema import SchemaManager

log = logging.getLogger(__name__)

# An arbitrary constant shared by every asyncproc migration runner.
ADVISORY_LOCK_KEY = 7_248_112_017
_FILE_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_PROCRASTINATE_DIRECTIVE = re.compile(r"^-- asyncproc:procrastinate-schema (\d+\.\d+)\s*$", re.MULTILINE)


class MigrationError(Exception):
    pass


@dataclass(frozen=True)
class Migration:
    version: str
    path: Path

    def sql(self) -> str:
        text = self.path.read_text()
        directive = _PROCRASTINATE_DIRECTIVE.search(text)
        if directive is None:
            return text
        wanted = directive.group(1)
        installed = metadata.version("procrastinate")
        if not (installed == wanted or installed.startswith(wanted + ".")):
            raise MigrationError(
                f"{self.path.name} needs procrastinate {wanted}.x, but {installed} is installed"
            )
        return SchemaManager.get_schema()


def discover(directory: Path) -> list[Migration]:
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if not match:
            raise MigrationError(f"unexpected file in {directory}: {path.name}")
        found.append(Migration(version=path.stem, path=path))
    if len({m.version[:4] for m in found}) != len(found):
        raise MigrationError(f"two migrations share a number in {directory}")
    return found


def _applied(conn: psycopg.Connection) -> set[str]:
    rows = conn.execute("SELECT version FROM asyncproc_migrations").fetchall()
    return {row["version"] for row in rows}


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
    applied_now = []
    for migration in migrations:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_KEY,))
            if migration.version in _applied(conn):
                continue
            log.info("applying migration %s", migration.version)
            conn.execute(migration.sql().encode())
            conn.execute(
                "INSERT INTO asyncproc_migrations (version) VALUES (%s)", (migration.version,)
            )
            applied_now.append(migration.version)
    return applied_now
