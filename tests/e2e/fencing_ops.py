"""Handlers that journal their runs, for tests/e2e/test_no_lock_waits.py and test_thread_fencing.py.

Loaded by the worker through ASYNCPROC_OPERATIONS_MODULE=tests.e2e.fencing_ops.
Every run appends lines to the file named by ASYNCPROC_FENCING_JOURNAL (when
set): `start`, a `tick` every 50 ms, and `end`, each with the task id, the
attempt, the pid and time.time(). Each line is one os.write on an O_APPEND
descriptor, so lines of concurrent runs (threads or processes) never mix.
Two runs of a task overlapped if their [first line, last line] intervals
intersect.

Payload:
  seconds        how long the first run runs (default 0)
  retry_seconds  how long every later run runs, once the journal has one (default: seconds);
                 a run given back at shutdown carries its attempt number again
  honour_stop    stop early when ctx.should_stop() turns true (default true);
                 false: run the full time whatever the worker asks
"""

from __future__ import annotations

import json
import os
import time

from asyncproc.operations import Stopped, operation

JOURNAL_ENV = "ASYNCPROC_FENCING_JOURNAL"
TICK_SECONDS = 0.05


def _line(event: str, ctx) -> None:
    path = os.environ.get(JOURNAL_ENV)
    if not path:
        return
    record = {"event": event, "task_id": str(ctx.task_id), "attempt": ctx.attempt, "pid": os.getpid(), "t": time.time()}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def journal_run(payload, ctx):
    seconds = float(payload.get("seconds", 0))
    journal = os.environ.get(JOURNAL_ENV)
    if journal and any(line["task_id"] == str(ctx.task_id) for line in read_journal(journal)):
        seconds = float(payload.get("retry_seconds", seconds))
    honour_stop = bool(payload.get("honour_stop", True))
    _line("start", ctx)
    try:
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if honour_stop:
                if ctx.stop_event.wait(min(TICK_SECONDS, remaining)):
                    raise Stopped("stopped on request")
            else:
                time.sleep(min(TICK_SECONDS, remaining))
            _line("tick", ctx)
        return {"attempt": ctx.attempt, "seconds": seconds}
    finally:
        _line("end", ctx)


# One handler under several names: a thread-isolated one per role, and one in a child process.
for _name in ("fence_thread", "fence_x", "fence_y", "fence_a", "fence_b", "fence_parked"):
    operation(_name, isolation="thread")(journal_run)
operation("fence_process")(journal_run)


def read_journal(path) -> list[dict]:
    """Every line of the journal, in file order (an absent file is an empty journal)."""
    try:
        with open(path) as journal:
            return [json.loads(line) for line in journal if line.strip()]
    except FileNotFoundError:
        return []


def runs(lines: list[dict], task_id: str) -> dict[int, tuple[float, float, list[dict]]]:
    """Each attempt of a task: (first line's time, last line's time, its lines)."""
    by_attempt: dict[int, list[dict]] = {}
    for line in lines:
        if line["task_id"] == task_id:
            by_attempt.setdefault(line["attempt"], []).append(line)
    return {
        attempt: (min(l["t"] for l in seen), max(l["t"] for l in seen), seen)
        for attempt, seen in sorted(by_attempt.items())
    }
