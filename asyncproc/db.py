"""Connections, the named-query loader for sql/*.sql, and database error translation.

Each process opens its own pool after fork. Every connection has TCP keepalives
and a TCP user timeout so that a silently cut connection is noticed in seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import socket
import weakref
from functools import cache
from pathlib import Path
from typing import Any, Iterator

import psycopg
import psycopg_pool
from psycopg.rows import dict_row

from asyncproc import jsonb
from asyncproc.config import DatabaseSettings
from asyncproc.errors import DatabaseUnavailable, InvalidTransition, TaskNotFound

log = logging.getLogger(__name__)
# A jsonb value that Python's json cannot decode must not fail the read of its row.
jsonb.install()

SQL_DIR = Path(__file__).with_name("sql")
_NAME_LINE = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


@cache
def queries() -> dict[str, str]:
    """All named queries: each block of sql/*.sql that starts with `-- name: x`."""
    found: dict[str, str] = {}
    for path in sorted(SQL_DIR.glob("*.sql")):
        parts = _NAME_LINE.split(path.read_text())
        for name, body in zip(parts[1::2], parts[2::2]):
            if name in found:
                raise RuntimeError(f"query {name} is defined twice ({path.name})")
            found[name] = body.strip()
    return found


def query(name: str) -> str:
    return queries()[name]


def connect_kwargs(settings: DatabaseSettings, application_name: str) -> dict[str, Any]:
    return {
        "application_name": application_name,
        "connect_timeout": max(1, round(settings.connect_timeout)),
        "keepalives": 1,
        "keepalives_idle": settings.keepalives_idle,
        "keepalives_interval": settings.keepalives_interval,
        "keepalives_count": settings.keepalives_count,
        # Unacknowledged data on a half-open connection fails after this long,
        # where the kernel default would wait for many minutes.
        "tcp_user_timeout": settings.tcp_user_timeout_ms,
        "row_factory": dict_row,
    }


def _autocommit(conn: psycopg.Connection[Any]) -> None:
    conn.autocommit = True


async def _autocommit_async(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.set_autocommit(True)


def _socket_has_data(conn: psycopg.BaseConnection[Any]) -> bool:
    try:
        readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    except (OSError, ValueError, psycopg.OperationalError):
        return True
    return bool(readable)


def _check_idle_connection(conn: psycopg.Connection[Any]) -> None:
    """Pool check that costs no round trip for a healthy idle connection.

    An idle connection receives nothing unless the server closed it or sent an
    error, so only a readable socket earns a real test query.
    """
    if conn.closed or conn.broken:
        raise psycopg.OperationalError("connection is closed")
    if _socket_has_data(conn):
        conn.execute("SELECT 1")


async def _check_idle_connection_async(conn: psycopg.AsyncConnection[Any]) -> None:
    if conn.closed or conn.broken:
        raise psycopg.OperationalError("connection is closed")
    if _socket_has_data(conn):
        await conn.execute("SELECT 1")


def _pool_options(
    settings: DatabaseSettings, application_name: str, max_size: int, kwargs: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "conninfo": settings.url,
        "min_size": 1,
        "max_size": max_size,
        "kwargs": kwargs or connect_kwargs(settings, application_name),
        "timeout": settings.connect_timeout,
        # Keep trying to reconnect for as long as the database is away.
        "reconnect_timeout": 0,
        "open": False,
        "name": application_name,
    }


def open_pool(settings: DatabaseSettings, application_name: str, max_size: int) -> psycopg_pool.ConnectionPool:
    """A sync pool that opens in the background: start-up never waits for the database.

    For request handlers: a request waits at most connect_timeout for a
    connection, and the server cancels a query after statement_timeout_ms,
    so no request outlives an outage or a stuck query.
    """
    kwargs = connect_kwargs(settings, application_name)
    kwargs["options"] = api_options(settings)
    pool = psycopg_pool.ConnectionPool(
        check=_check_idle_connection,
        configure=_autocommit,
        **_pool_options(settings, application_name, max_size, kwargs),
    )
    pool.open(wait=False)
    return pool


class SeverableAsyncPool(psycopg_pool.AsyncConnectionPool):
    """An async pool that can break every connection it opened, busy ones included.

    A query whose packets were lost on a half-open connection waits for an
    answer that never comes, and nothing in libpq bounds that wait. Breaking
    the socket fails the wait at once, like a TCP user timeout would.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        self._made: weakref.WeakSet[psycopg.AsyncConnection[Any]] = weakref.WeakSet()
        super().__init__(*args, configure=self._configure_and_track, **kwargs)

    async def _configure_and_track(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await _autocommit_async(conn)
        self._made.add(conn)

    def sever(self) -> int:
        """Shut down every open connection's socket; returns how many."""
        return sum(sever_connection(conn) for conn in list(self._made))


def sever_connection(conn: psycopg.BaseConnection[Any]) -> bool:
    """Shut down the connection's socket, failing any query waiting on it at once; whether it was open."""
    if conn.closed:
        return False
    try:
        # shutdown() acts on the socket itself, so a dup of the descriptor
        # reaches the one libpq owns without closing it under libpq's feet.
        with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except (OSError, psycopg.OperationalError):
        return False
    return True


# Every statement of ours reads a few rows through an index, yet on tables of
# millions of rows the planner's estimates pass jit_above_cost, and PostgreSQL
# then compiles the statement with LLVM before running it: at a million pending
# tasks, analysed, each sweep spent half a second of CPU compiling a statement
# that runs in milliseconds (tests/integration/test_plans.py).
NO_JIT = "-c jit=off"


def api_options(settings: DatabaseSettings) -> str:
    """Server settings of every API connection."""
    return f"{NO_JIT} -c statement_timeout={settings.statement_timeout_ms}"


def worker_options(settings: DatabaseSettings) -> str:
    """Server settings of every worker connection.

    A statement waits at most worker_lock_timeout_ms for a row lock and runs at
    most worker_statement_timeout_ms: a row that psql holds, or a stuck query,
    fails one statement instead of stalling the worker. Every worker statement
    (Procrastinate's fetch included) wants a few rows through an index, and on
    a new or unanalysed table the planner would read the backlog's whole index
    instead, so the other plans are ruled out (tests/integration/test_plans.py).
    """
    return (
        f"{NO_JIT} -c lock_timeout={settings.worker_lock_timeout_ms}"
        f" -c statement_timeout={settings.worker_statement_timeout_ms}"
        " -c enable_seqscan=off -c enable_bitmapscan=off"
    )


def async_pool(settings: DatabaseSettings, application_name: str, max_size: int) -> SeverableAsyncPool:
    """An unopened async pool for the worker; the caller opens it inside its event loop."""
    kwargs = connect_kwargs(settings, application_name)
    kwargs["options"] = worker_options(settings)
    return SeverableAsyncPool(
        check=_check_idle_connection_async,
        **_pool_options(settings, application_name, max_size, kwargs),
    )


def connect(database_url: str, settings: DatabaseSettings | None = None, application_name: str = "asyncproc") -> psycopg.Connection[Any]:
    """One standalone connection, for the CLI, migrations and tests."""
    kwargs = connect_kwargs(settings or DatabaseSettings(), application_name)
    return psycopg.connect(database_url, autocommit=True, options=NO_JIT, **kwargs)


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """The one place where database failures become asyncproc errors."""
    try:
        yield
    except psycopg.errors.NoDataFound as exc:
        raise TaskNotFound(exc.diag.message_primary or "No such task") from exc
    except psycopg.errors.CheckViolation as exc:
        raise InvalidTransition(exc.diag.message_primary or "Invalid status change") from exc
    except (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout) as exc:
        log.warning("database unavailable: %s", str(exc).strip().splitlines()[0] if str(exc) else exc)
        raise DatabaseUnavailable("The database is unavailable; try again shortly") from exc


def _database_error(exc: BaseException) -> BaseException | None:
    """The psycopg or pool error behind `exc`, following causes (Procrastinate wraps them)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, (psycopg.Error, psycopg_pool.PoolTimeout)):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


# Connection exceptions (08), and the server going away (57P01-57P03).
_CONNECTION_SQLSTATES = ("08", "57P01", "57P02", "57P03")


def is_connection_error(exc: BaseException) -> bool:
    """Whether `exc` means the database could not be reached or dropped us, as opposed to refusing a query."""
    error = _database_error(exc)
    if isinstance(error, psycopg_pool.PoolTimeout):
        return True
    if not isinstance(error, psycopg.Error):
        return False
    sqlstate = error.sqlstate
    if sqlstate is None:
        return isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError))
    return sqlstate.startswith(_CONNECTION_SQLSTATES)


def describe_error(exc: BaseException) -> str:
    """One line naming what went wrong: the SQLSTATE and message of a database error, else the exception."""
    error = _database_error(exc) or exc
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    sqlstate = getattr(error, "sqlstate", None)
    label = f"{type(error).__name__} {sqlstate}" if sqlstate else type(error).__name__
    return f"{label}: {first}" if first else label
