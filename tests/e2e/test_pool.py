"""The process pool on its own: data that cannot cross to a child fails the call, never the pool."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid

import pytest

from asyncproc.config import SecondsRange
from worker.pool import Call, PermanentHandlerError, ProcessPool


def call(operation: str, payload) -> Call:
    return Call(operation, payload, uuid.uuid4(), 1, 3, None, SecondsRange(0, 0), None)


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def test_a_payload_that_cannot_be_sent_to_a_child_fails_its_call_and_the_pool_goes_on():
    async def scenario():
        pool = ProcessPool("tests.e2e.custom_operations", 2)
        await pool.open()
        try:
            with pytest.raises(PermanentHandlerError, match="the payload cannot be passed to the handler's process"):
                await pool.run(call("shout", {"deep": nested(100_000)}), 10, lambda percent, message: None)
            return await pool.run(call("shout", {"text": "still here"}), 10, lambda percent, message: None)
        finally:
            await pool.close()

    assert asyncio.run(scenario()) == {"text": "STILL HERE", "attempt": 1}


def test_a_call_given_to_an_idle_child_that_died_runs_in_another_and_costs_nothing():
    """A handler process killed while idle (or ended by its lease's deadline) never took the call: the handler
    did not run, so the call goes to a fresh child instead of failing its attempt as a crash."""

    async def scenario():
        pool = ProcessPool("tests.e2e.custom_operations", 1)
        await pool.open()
        try:
            await pool.run(call("shout", {"text": "first"}), 10, lambda percent, message: None)
            (idle,) = pool._idle
            os.kill(idle.process.pid, signal.SIGKILL)
            # Dead, and joined without yielding to the loop: the pool has not read its socket's end yet.
            idle.process.join(10)
            return await pool.run(call("shout", {"text": "second"}), 10, lambda percent, message: None)
        finally:
            await pool.close()

    assert asyncio.run(scenario()) == {"text": "SECOND", "attempt": 1}
