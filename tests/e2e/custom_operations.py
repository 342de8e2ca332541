"""A user's handler module, loaded by the e2e worker via ASYNCPROC_OPERATIONS_MODULE."""

import asyncio
import ctypes
import json
import os
import signal
import time

from asyncproc.operations import operation


@operation("shout")
def shout(payload, ctx):
    return {"text": str(payload.get("text", "")).upper(), "attempt": ctx.attempt}


@operation("async_echo")
async def async_echo(payload, ctx):
    await asyncio.sleep(0)
    return payload


@operation("nul_result")
async def nul_result(payload, ctx):
    # Valid JSON that PostgreSQL's jsonb refuses: its write fails with a DataError.
    return {"text": "a\u0000b"}


@operation("steps")
def steps(payload, ctx):
    """Reports progress through `count` steps of `seconds` each; honours cancellation."""
    count = int(payload.get("count", 3))
    for step in range(1, count + 1):
        if ctx.stop_event.wait(float(payload.get("seconds", 0.3))):
            return {"stopped_at": step}
        ctx.report_progress(step * 100 // (count + 1), f"step {step}")
    return {"steps": count}


@operation("whoami", isolation="thread")  # records the worker's own pid
def whoami(payload, ctx):
    """Records each run (task, worker pid, start, end) so a test can see who ran what and when.

    One append-only file per worker process in ASYNCPROC_TEST_RUNS_DIR; each
    run is a single os.write of one short line, which O_APPEND keeps whole.
    """
    started = time.time()
    time.sleep(float(payload.get("seconds", 0)))
    finished = time.time()
    _append_run_event({"task_id": str(ctx.task_id), "pid": os.getpid(), "started": started, "finished": finished})
    return {"pid": os.getpid()}


def _append_line(path: str, record: dict) -> None:
    """One os.write of one short line, which O_APPEND keeps whole among concurrent writers."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def _append_run_event(event: dict) -> None:
    _append_line(os.path.join(os.environ["ASYNCPROC_TEST_RUNS_DIR"], f"{os.getpid()}.jsonl"), event)


def _record_run(ctx, **fields):
    """Appends this run to ASYNCPROC_TEST_RUNS_DIR/<task id>.jsonl, with the pids of
    earlier runs of the same task that are still alive (there must be none)."""
    path = os.path.join(os.environ["ASYNCPROC_TEST_RUNS_DIR"], f"{ctx.task_id}.jsonl")
    earlier = []
    if os.path.exists(path):
        with open(path) as runs:
            earlier = [json.loads(line)["pid"] for line in runs]
    alive = [pid for pid in earlier if _alive(pid)]
    _append_line(path, {"pid": os.getpid(), "attempt": ctx.attempt, "earlier_alive": alive, **fields})


def _ancestors() -> list[int]:
    """This process's parent and grandparent: the worker, or its fork server and the worker."""
    parent = os.getppid()
    with open(f"/proc/{parent}/stat") as stat:
        return [parent, int(stat.read().rpartition(")")[2].split()[1])]


@operation("journal")
def journal(payload, ctx):
    """Writes a line when a run starts and when it ends, so a test can tell whether two runs of a task overlapped.

    Fails its first `fail_attempts` attempts, to exercise retries.
    """
    base = {"task_id": str(ctx.task_id), "attempt": ctx.attempt, "pid": os.getpid(), "ancestors": _ancestors()}
    _append_run_event({**base, "event": "start", "t": time.time()})
    try:
        time.sleep(float(payload.get("seconds", 0)))
        if ctx.attempt <= int(payload.get("fail_attempts", 0)):
            raise RuntimeError(f"planned failure of attempt {ctx.attempt}")
        return {"attempt": ctx.attempt}
    finally:
        _append_run_event({**base, "event": "end", "t": time.time()})


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


@operation("crash")
def crash(payload, ctx):
    """Takes its own process down on its first `times` attempts (default: every one), as `how` says."""
    if ctx.attempt <= payload.get("times", 100):
        how = payload["how"]
        if how == "exit":
            os._exit(3)
        elif how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif how == "segfault":
            ctypes.string_at(0)
    return {"survived_attempt": ctx.attempt}


@operation("hang")
def hang(payload, ctx):
    """Ignores should_stop(): sleeps, or spins when `spin` is set, for `seconds`."""
    _record_run(ctx)
    seconds = float(payload.get("seconds", 60))
    if payload.get("spin"):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            pass
    else:
        time.sleep(seconds)
    return {"hung": seconds}


@operation("hang_briefly", timeout_seconds=0.5)
def hang_briefly(payload, ctx):
    """Its operation's time limit is half a second; it sleeps for `seconds`."""
    time.sleep(float(payload.get("seconds", 60)))
    return {"slept": True}


@operation("hog", memory_mb=64)
def hog(payload, ctx):
    """Allocates and touches `mb` megabytes; its operation allows 64."""
    block = bytearray(int(payload["mb"]) * 1024 * 1024)
    block[::4096] = b"x" * len(block[::4096])
    return {"allocated_mb": payload["mb"]}


@operation("hang_in_thread", isolation="thread")
def hang_in_thread(payload, ctx):
    """Runs in a worker thread; stops only when asked."""
    ctx.stop_event.wait(float(payload.get("seconds", 60)))
    return {"stopped": ctx.should_stop()}


@operation("deep_result")
def deep_result(payload, ctx):
    """Returns a list nested `depth` levels deep, built without recursion."""
    value = []
    for _ in range(int(payload["depth"])):
        value = [value]
    return value


@operation("big_number")
def big_number(payload, ctx):
    return {"n": 10 ** int(payload["digits"])}


@operation("hog_default")
def hog_default(payload, ctx):
    """Allocates `mb` megabytes under the worker's ASYNCPROC_HANDLER_MEMORY_MB."""
    return hog(payload, ctx)


@operation("async_hang")
async def async_hang(payload, ctx):
    await asyncio.sleep(float(payload.get("seconds", 60)))
    return {"hung": True}
