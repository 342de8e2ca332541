"""Handlers that record every run outside the service, for the history checker.

Each run appends short JSON lines to the file named by HISTORY_LOG: `start`,
a `tick` every TICK_SECONDS while it runs, and `end` when it returns or
raises. A run killed by SIGKILL has no `end`; its last tick bounds it. Each
line is one os.write on an O_APPEND descriptor, which the kernel keeps whole
and ordered among concurrent writers of every process.

The payload plans every attempt: `plan` is a list of [seconds, outcome] with
outcome "ok", "fail" or "permanent", taken by (attempt - 1) modulo its length
(an operator retry may take the attempt number past the list). `stubborn`
handlers ignore ctx.should_stop(), so that stops must end them by force (a
process) or wait for them (a thread).

This module is imported by the API, the worker and every handler child, so
it must stay cheap to import and import nothing of the tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid

from asyncproc.operations import PermanentError, Stopped, operation

TICK_SECONDS = 0.05
# Every operation shares one schema: a psql INSERT without `plan` is refused
# by the worker, which gives the ledger a failed attempt that never ran.
SCHEMA = {
    "type": "object",
    "required": ["plan"],
    "properties": {
        "plan": {"type": "array", "items": {"type": "array"}},
        "stubborn": {"type": "boolean"},
    },
}


class PlannedFailure(RuntimeError):
    pass


def _write(record: dict) -> None:
    fd = os.open(os.environ["HISTORY_LOG"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())
    finally:
        os.close(fd)


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rpartition(")")[2].split()[1])


def _worker_pid(isolation: str) -> int:
    # A process-isolated handler runs in a child of the fork server, itself a child of the worker.
    if isolation == "process":
        return _parent_of(os.getppid())
    return os.getpid()


class Run:
    def __init__(self, op: str, isolation: str, payload: dict, ctx) -> None:
        plan = payload["plan"]
        seconds, self.outcome = plan[(ctx.attempt - 1) % len(plan)]
        self.seconds = float(seconds)
        self.stubborn = bool(payload.get("stubborn", False))
        self.ctx = ctx
        self.base = {
            "task": str(ctx.task_id),
            "attempt": ctx.attempt,
            "run": uuid.uuid4().hex[:16],
            "op": op,
            "pid": os.getpid(),
            "wpid": _worker_pid(isolation),
        }
        self.deadline = time.monotonic() + self.seconds
        self.ended = "raised"

    def line(self, event: str, **extra) -> None:
        _write({**self.base, "e": event, "t": time.time(), **extra})

    def start(self) -> None:
        self.line("start", seconds=self.seconds, planned=self.outcome, stubborn=self.stubborn)

    def step(self) -> float | None:
        """The next pause, or None when the run should stop ticking."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            return None
        if self.ctx.should_stop() and not self.stubborn:
            self.ended = "stopped"
            raise Stopped("history handler stopped on request")
        self.line("tick")
        return min(TICK_SECONDS, left)

    def finish(self) -> dict:
        if self.outcome == "fail":
            self.ended = "failed"
            raise PlannedFailure(f"planned failure of attempt {self.ctx.attempt}")
        if self.outcome == "permanent":
            self.ended = "failed"
            raise PermanentError(f"planned permanent failure of attempt {self.ctx.attempt}")
        self.ended = "ok"
        return {"run": self.base["run"]}

    def end(self) -> None:
        self.line("end", outcome=self.ended)


def _sync(op: str, isolation: str):
    def handler(payload, ctx):
        run = Run(op, isolation, payload, ctx)
        run.start()
        try:
            while (pause := run.step()) is not None:
                time.sleep(pause)
            return run.finish()
        finally:
            run.end()

    return handler


def _async(op: str, isolation: str):
    async def handler(payload, ctx):
        run = Run(op, isolation, payload, ctx)
        run.start()
        try:
            while (pause := run.step()) is not None:
                await asyncio.sleep(pause)
            return run.finish()
        except asyncio.CancelledError:
            run.ended = "cancelled"
            raise
        finally:
            run.end()

    return handler


# name: (async?, isolation as registered, isolation where it runs)
OPERATIONS = {
    "hist_process": (False, None, "process"),
    "hist_thread": (False, "thread", "thread"),
    "hist_async": (True, None, "loop"),
    "hist_async_process": (True, "process", "process"),
}

for _name, (_is_async, _isolation, _where) in OPERATIONS.items():
    _factory = _async if _is_async else _sync
    operation(_name, input_schema=SCHEMA, isolation=_isolation)(_factory(_name, _where))
