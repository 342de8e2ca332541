"""Session fixtures: a fresh migrated database, a Redis, and helpers; the fast
and the full suite; a data directory where no `asyncproc up` runs.

The database comes from DATABASE_URL when it is set: the session creates a
database of its own on that server and drops it at the end. Without
DATABASE_URL the session starts a throwaway embedded PostgreSQL (fsync off),
exactly as `asyncproc up` does on a fresh machine.

`pytest` runs the fast suite; `pytest --full` adds the tests marked `full`:
everything under tests/e2e and tests/faults (the bench and the browser tests
among them), and the slowest integration tests. A test file named on the
command line runs whole, --full or not, and a marker expression (`-m faults`)
chooses its tests itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from asyncproc import db, migrate
from asyncproc.config import DatabaseSettings, Settings, WorkerSettings
from asyncproc.embedded import EmbeddedPostgres, free_port
from tests.support import wait_for

# Directories under tests/ whose every test is marked `full`.
FULL_DIRECTORIES = ("e2e", "faults")
_DESELECTED = pytest.StashKey[int]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--full", action="store_true",
        help="run the full suite: also the tests marked full (e2e, faults, the bench, the browser, the slowest integration tests)",
    )


def pytest_configure(config: pytest.Config) -> None:
    # Run beside a developer's `asyncproc up`, in its directory, a command
    # started without DATABASE_URL would find its embedded database and join
    # it as a real worker. Every command a test runs, in this process or in a
    # child that inherits the environment, looks in this empty directory instead.
    scratch = tempfile.mkdtemp(prefix="asyncproc-test-data-")
    config.add_cleanup(lambda: shutil.rmtree(scratch, ignore_errors=True))
    os.environ["ASYNCPROC_DATA_DIR"] = scratch


def _named_files(config: pytest.Config) -> set[Path]:
    named = (config.invocation_params.dir / arg.split("::")[0] for arg in config.args)
    return {path.resolve() for path in named if path.is_file()}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests_dir = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(tests_dir) and item.path.relative_to(tests_dir).parts[0] in FULL_DIRECTORIES:
            item.add_marker(pytest.mark.full)
    if config.getoption("--full") or config.getoption("markexpr"):
        return
    named = _named_files(config)
    kept, deselected = [], []
    for item in items:
        (deselected if item.get_closest_marker("full") and item.path not in named else kept).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept
    config.stash[_DESELECTED] = len(deselected)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    deselected = config.stash.get(_DESELECTED, 0)
    if deselected:
        terminalreporter.write_line(
            f"{deselected} tests of the full suite (e2e, faults, the bench, the browser) were left out: pytest --full runs them"
        )


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """A PostgreSQL server where the session may create databases."""
    external = os.environ.get("DATABASE_URL")
    if external:
        yield external
        return
    base = Path(tempfile.mkdtemp(prefix="asyncproc-test-pg-"))
    cluster = EmbeddedPostgres(base, durable=False)
    cluster.start()
    try:
        yield cluster.admin_url()
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def _create_database(server: str, prefix: str) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return make_conninfo(server, dbname=name)


def _drop_database(server: str, url: str) -> None:
    name = conninfo_to_dict(url)["dbname"]
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def empty_database(server_url: str) -> Iterator[Callable[[], str]]:
    """A factory of fresh, unmigrated databases, all dropped at the end."""
    made: list[str] = []

    def make() -> str:
        made.append(_create_database(server_url, "asyncproc_empty"))
        return made[-1]

    yield make
    for url in made:
        _drop_database(server_url, url)


@pytest.fixture(scope="session")
def database_url(server_url: str) -> Iterator[str]:
    url = _create_database(server_url, "asyncproc_test")
    try:
        with db.connect(url) as conn:
            migrate.apply_all(conn, Settings().migrations_dir)
        yield url
    finally:
        _drop_database(server_url, url)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """REDIS_URL, or a throwaway redis-server; skipped when neither exists."""
    external = os.environ.get("REDIS_URL")
    if external:
        yield external
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("needs Redis: set REDIS_URL or put redis-server on PATH")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        import redis

        client = redis.Redis.from_url(url)

        def pong() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_for(pong, 10, "redis-server to start")
        yield url
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="session")
def settings(database_url: str) -> Settings:
    return Settings(db=DatabaseSettings(url=database_url), worker=WorkerSettings(retry_backoff_seconds=0.05))


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection]:
    with db.connect(database_url) as connection:
        yield connection


WORKER_OPTIONS = "-c asyncproc.writer=worker"


@pytest.fixture
def worker_conn(database_url: str) -> Iterator[psycopg.Connection]:
    """A connection that the status machine takes for the worker's (migrations/0007), for setting up states."""
    with psycopg.connect(database_url, autocommit=True, options=WORKER_OPTIONS, row_factory=dict_row) as connection:
        yield connection


@pytest.fixture
def clean_db(conn: psycopg.Connection) -> psycopg.Connection:
    """The session database with no tasks and no jobs, and no counts or history of
    earlier tests' tasks (those outlive deleted rows), for tests that count rows.

    Workers of a running service may hold these tables in another order (the
    sweep, the ledger's compaction): PostgreSQL then picks one side of the
    deadlock to fail, and the TRUNCATE is simply tried again.
    """
    attempt = 1
    while True:
        try:
            conn.execute(
                "TRUNCATE tasks, procrastinate_jobs, procrastinate_events,"
                " asyncproc_ledger_events, asyncproc_counts, asyncproc_rollups CASCADE"
            )
            return conn
        except psycopg.errors.DeadlockDetected:
            if attempt == 5:
                raise
            attempt += 1
