"""Handlers that record every run where a test can see it, for tests/faults/test_fencing.py.

The worker loads this module through ASYNCPROC_OPERATIONS_MODULE. Each run of
a handler appends JSON lines to the file named by ASYNCPROC_TEST_FENCING_LOG:
a `start` line, a `tick` every 50 ms while it runs and an `end` line when it
returns, each with the task id, ctx.attempt, the pid and time.time(). Every
line is one os.write of a short line with O_APPEND, which keeps it whole
among concurrent writers. A run's [first line, last line] is when it ran; a
run killed by force has no `end` line. Two runs of one task overlap when their
intervals intersect, and a `start` line also lists the earlier runs of its
task that are still running then (no `end` line, and their process alive),
which catches an overlap even inside one tick.

Both handlers are sync and so run in a child process (isolation "process",
the default), and neither honours ctx.should_stop(): only a kill ends one early.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncproc.operations import operation

LOG_VARIABLE = "ASYNCPROC_TEST_FENCING_LOG"
TICK_SECONDS = 0.05
# A gate that never opens fails its task instead of holding a worker forever.
GATE_PATIENCE_SECONDS = 60.0


@dataclass
class Run:
    """One run of a handler, as its lines tell it."""

    run: str
    operation: str
    task_id: str
    attempt: int
    pid: int
    first: float
    last: float
    ended: bool = False
    running_elsewhere: list[int] = field(default_factory=list)
    group: str | None = None

    def overlaps(self, other: Run) -> bool:
        return self.first <= other.last and other.first <= self.last

    def describe(self, origin: float = 0.0) -> str:
        end = "ended" if self.ended else "never ended"
        return (
            f"attempt {self.attempt} in pid {self.pid}: {self.first - origin:.2f}s to {self.last - origin:.2f}s"
            f" ({end}; earlier runs still running at its start: {self.running_elsewhere or 'none'})"
        )


def read_lines(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    # A line being appended right now may be read half-written: only whole lines count.
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def read_runs(path: Path) -> list[Run]:
    """Every run recorded in `path`, in the order they started."""
    runs: dict[str, Run] = {}
    for line in read_lines(path):
        run = runs.get(line["run"])
        if run is None:
            run = runs[line["run"]] = Run(
                run=line["run"], operation=line["operation"], task_id=line["task_id"], attempt=line["attempt"],
                pid=line["pid"], first=line["at"], last=line["at"],
            )
        run.last = max(run.last, line["at"])
        if line["event"] == "start":
            run.running_elsewhere = line["running_elsewhere"]
            run.group = line.get("group")
        elif line["event"] == "end":
            run.ended = True
    return sorted(runs.values(), key=lambda run: run.first)


def process_alive(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


class _Recorder:
    def __init__(self, name: str, payload: dict[str, Any], ctx: Any):
        self.path = Path(os.environ[LOG_VARIABLE])
        self.base = {
            "run": uuid.uuid4().hex, "operation": name, "task_id": str(ctx.task_id),
            "attempt": ctx.attempt, "pid": os.getpid(),
        }
        earlier = [run for run in read_runs(self.path) if run.task_id == self.base["task_id"]]
        self.earlier = earlier
        running = sorted(
            {run.pid for run in earlier if not run.ended and run.pid != os.getpid() and process_alive(run.pid)}
        )
        self.write("start", running_elsewhere=running, group=payload.get("group"))

    def write(self, event: str, **extra: Any) -> None:
        line = json.dumps({**self.base, "event": event, "at": time.time(), **extra}) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def tick(self) -> None:
        time.sleep(TICK_SECONDS)
        self.write("tick")


@operation("fence_run")
def fence_run(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Runs `seconds`, or until the file `until_file` exists if given (`seconds` at most); ignores should_stop.

    A run after an earlier recorded run of its task runs `rerun_seconds` instead, when given.
    """
    recorder = _Recorder("fence_run", payload, ctx)
    seconds = float(payload.get("seconds", 0))
    until = Path(payload["until_file"]) if "until_file" in payload else None
    if recorder.earlier and "rerun_seconds" in payload:
        seconds, until = float(payload["rerun_seconds"]), None
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (until is not None and until.exists()):
        recorder.tick()
    recorder.write("end")
    return {"run": recorder.base["run"], "attempt": ctx.attempt}


@operation("fence_gate")
def fence_gate(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Runs until `count` runs of gate `group` have started: that many tasks ran at once."""
    recorder = _Recorder("fence_gate", payload, ctx)
    group, count = payload["group"], int(payload["count"])
    deadline = time.monotonic() + GATE_PATIENCE_SECONDS
    while len([run for run in read_runs(recorder.path) if run.group == group]) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"gate {group!r}: fewer than {count} runs started within {GATE_PATIENCE_SECONDS:g}s")
        recorder.tick()
    recorder.write("end")
    return {"run": recorder.base["run"]}
