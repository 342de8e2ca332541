"""A user's handler module, loaded by the e2e worker via ASYNCPROC_OPERATIONS_MODULE."""

import asyncio
import json
import os
import time

from asyncproc.operations import operation


@operation("shout")
def shout(payload, ctx):
    return {"text": str(payload.get("text", "")).upper(), "attempt": ctx.attempt}


@operation("async_echo")
async def async_echo(payload, ctx):
    await asyncio.sleep(0)
    return payload


@operation("steps")
def steps(payload, ctx):
    """Reports progress through `count` steps of `seconds` each; honours cancellation."""
    count = int(payload.get("count", 3))
    for step in range(1, count + 1):
        if ctx.stop_event.wait(float(payload.get("seconds", 0.3))):
            return {"stopped_at": step}
        ctx.report_progress(step * 100 // (count + 1), f"step {step}")
    return {"steps": count}


@operation("whoami")
def whoami(payload, ctx):
    """Records each run (task, worker pid, start, end) so a test can see who ran what and when.

    One append-only file per worker process in ASYNCPROC_TEST_RUNS_DIR; each
    run is a single os.write of one short line, which O_APPEND keeps whole.
    """
    started = time.time()
    time.sleep(float(payload.get("seconds", 0)))
    finished = time.time()
    pid = os.getpid()
    line = json.dumps({"task_id": str(ctx.task_id), "pid": pid, "started": started, "finished": finished}) + "\n"
    path = os.path.join(os.environ["ASYNCPROC_TEST_RUNS_DIR"], f"{pid}.jsonl")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    return {"pid": pid}


def _append_run_event(event: dict) -> None:
    path = os.path.join(os.environ["ASYNCPROC_TEST_RUNS_DIR"], f"{os.getpid()}.jsonl")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (json.dumps(event) + "\n").encode())
    finally:
        os.close(fd)


@operation("journal")
def journal(payload, ctx):
    """Writes a line when a run starts and when it ends, so a test can tell whether two runs of a task overlapped.

    Fails its first `fail_attempts` attempts, to exercise retries.
    """
    base = {"task_id": str(ctx.task_id), "attempt": ctx.attempt, "pid": os.getpid(), "ppid": os.getppid()}
    _append_run_event({**base, "event": "start", "t": time.time()})
    try:
        time.sleep(float(payload.get("seconds", 0)))
        if ctx.attempt <= int(payload.get("fail_attempts", 0)):
            raise RuntimeError(f"planned failure of attempt {ctx.attempt}")
        return {"attempt": ctx.attempt}
    finally:
        _append_run_event({**base, "event": "end", "t": time.time()})
