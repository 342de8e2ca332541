"""Background loops survive any error, and say which kind it was: a lost database, or a query the database refused."""

from __future__ import annotations

import asyncio
import logging

import psycopg
import pytest
from procrastinate import exceptions as procrastinate_errors

from asyncproc import db
from asyncproc.loops import FAILING_AFTER, LoopHealth, run_periodically
from tests.conftest import free_port


def _raised(call) -> BaseException:
    try:
        call()
    except BaseException as exc:  # the error itself is what the test inspects
        return exc
    raise AssertionError("expected an error")


@pytest.fixture
def real_errors(database_url) -> dict[str, BaseException]:
    """Errors as PostgreSQL and psycopg really raise them."""
    with db.connect(database_url) as conn:
        conn.execute("SET statement_timeout = 50")
        errors = {
            "renamed function": _raised(lambda: conn.execute("SELECT asyncproc_no_such_function()")),
            "statement timeout": _raised(lambda: conn.execute("SELECT pg_sleep(1)")),
        }
    with db.connect(database_url) as conn:
        errors["deadlock"] = _raised(
            lambda: conn.execute("DO $$ BEGIN RAISE EXCEPTION 'deadlock' USING ERRCODE = 'deadlock_detected'; END $$")
        )
    with db.connect(database_url) as conn, db.connect(database_url) as killer:
        pid = conn.execute("SELECT pg_backend_pid() AS pid").fetchone()["pid"]
        killer.execute("SELECT pg_terminate_backend(%s)", (pid,))
        errors["terminated"] = _raised(lambda: conn.execute("SELECT 1"))
    errors["refused"] = _raised(lambda: psycopg.connect(f"postgresql://postgres@127.0.0.1:{free_port()}/x", connect_timeout=2))
    try:
        raise procrastinate_errors.ConnectorException("fetch failed") from errors["refused"]
    except procrastinate_errors.ConnectorException as wrapped:
        errors["wrapped by procrastinate"] = wrapped
    return errors


@pytest.mark.parametrize("kind", ["terminated", "refused", "wrapped by procrastinate"])
def test_a_lost_database_is_a_connection_error(real_errors, kind):
    assert db.is_connection_error(real_errors[kind])


@pytest.mark.parametrize("kind", ["renamed function", "statement timeout", "deadlock"])
def test_a_refused_query_is_not_called_a_lost_database(real_errors, kind, caplog):
    error = real_errors[kind]
    assert not db.is_connection_error(error)
    health = LoopHealth("sweep")
    with caplog.at_level(logging.WARNING):
        health.failed(error)
    (record,) = caplog.records
    assert "lost the database" not in record.getMessage()
    assert record.exc_info is not None, "logged without its traceback"
    assert error.sqlstate in record.getMessage()


def test_a_loop_survives_every_failure_and_reports_when_it_keeps_failing(real_errors):
    health = LoopHealth("sweep")
    outcomes = [real_errors["renamed function"]] * FAILING_AFTER + [RuntimeError("a bug")] + [None, None]
    states: list[str] = []

    async def step() -> None:
        outcome = outcomes.pop(0)
        if not outcomes:
            stopping.set()
        states.append(health.state)
        if outcome is not None:
            raise outcome

    async def main() -> None:
        await run_periodically(health, step, 0.001, stopping)

    stopping = asyncio.Event()
    asyncio.run(asyncio.wait_for(main(), 10))
    assert states == ["ok"] * FAILING_AFTER + ["failing", "failing", "ok"]
    assert health.failures_total == FAILING_AFTER + 1
    assert health.state == "ok"
