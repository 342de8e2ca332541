"""Which releases may run side by side (docs/production.md, "Upgrading").

The schema says which generations of the code it serves
(migrations/current/05_schema_generation.sql); a real `asyncproc worker` or
`asyncproc api` that it does not serve refuses to start with one line that
says what to run, and one it still serves (the previous release's, in a
rolling deploy) starts. A later release's schema is played here by replacing
that function, as that release's `asyncproc migrate` would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Iterator

import pytest

from asyncproc import db, migrate
from asyncproc.config import Settings
from asyncproc.embedded import free_port
from tests.support import connect, insert_task, migrated_database, task_row, wait_for

CODE = migrate.CODE_GENERATION
SCHEMA_FILE = Settings().migrations_dir / "current" / "05_schema_generation.sql"


@pytest.fixture(scope="module")
def schema_url(empty_database) -> str:
    return migrated_database(empty_database)


@pytest.fixture
def schema(schema_url) -> Iterator[str]:
    yield schema_url
    with db.connect(schema_url) as conn:
        conn.execute(SCHEMA_FILE.read_text())


def _serve(url: str, generation: int, oldest: int) -> None:
    with db.connect(url) as conn:
        conn.execute(
            "CREATE OR REPLACE FUNCTION asyncproc_schema_generation(OUT generation integer, OUT oldest_code integer)"
            f" LANGUAGE sql AS $$ SELECT {int(generation)}, {int(oldest)} $$"
        )


def _env(url: str) -> dict[str, str]:
    return {**os.environ, "DATABASE_URL": url, "ASYNCPROC_LOG_FORMAT": "text", "REDIS_URL": ""}


def _refusal(url: str, *command: str) -> str:
    result = subprocess.run([sys.executable, "-m", "asyncproc.cli", *command], env=_env(url),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


def _workers(url: str) -> int:
    with db.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM procrastinate_workers").fetchone()["count"]


def test_the_schema_serves_the_code_of_this_release(schema):
    with db.connect(schema) as conn:
        migrate.check_schema_serves_this_code(conn)


@pytest.mark.parametrize("command", [["worker"], ["api", "--bind", f"127.0.0.1:{free_port()}"]], ids=["worker", "api"])
def test_a_schema_that_no_longer_serves_this_release_is_refused(schema, command):
    _serve(schema, CODE + 2, CODE + 1)
    line = _refusal(schema, *command)
    assert line == (
        f"asyncproc: the database was migrated by a newer asyncproc (schema generation {CODE + 2}), which no longer"
        f" serves this release's code (generation {CODE}; it serves {CODE + 1} and later): run the newer release"
    )
    assert _workers(schema) == 0


@pytest.mark.parametrize("command", [["worker"], ["api", "--bind", f"127.0.0.1:{free_port()}"]], ids=["worker", "api"])
def test_a_schema_older_than_this_release_is_refused_until_migrate_runs(schema, command):
    _serve(schema, CODE - 1, CODE - 1)
    assert _refusal(schema, *command) == (
        f"asyncproc: the database's schema is generation {CODE - 1}, older than this release's code (generation {CODE}):"
        " run this release's `asyncproc migrate` first"
    )


def test_a_database_migrated_by_no_release_that_records_a_generation_is_refused(schema):
    with db.connect(schema) as conn:
        conn.execute("DROP FUNCTION asyncproc_schema_generation()")
    assert _refusal(schema, "worker") == (
        "asyncproc: the database records no schema generation (a release before it, or no `asyncproc migrate` yet):"
        " run this release's `asyncproc migrate` first"
    )


def test_a_newer_schema_that_still_serves_this_release_runs_its_worker(schema, tmp_path):
    # A rolling deploy: the next release has migrated, and this release's workers keep running and restarting.
    _serve(schema, CODE + 1, CODE)
    log = tmp_path / "worker.log"
    with log.open("w") as output:
        worker = subprocess.Popen([sys.executable, "-m", "asyncproc.cli", "worker"], env=_env(schema),
                                  stdout=output, stderr=subprocess.STDOUT)
    try:
        with connect(schema) as conn:
            task_id = insert_task(conn)
            wait_for(lambda: worker.poll() is not None or task_row(conn, task_id)["status"] == "completed", 120,
                     "the worker to run a task")
        assert worker.poll() is None, log.read_text()
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=90)
    assert worker.returncode == 0, log.read_text()
