"""The fault schedule of the history checker, and the threads that carry it out.

Everything random is drawn up front from `random.Random(seed)`: the times,
kinds and parameters of every action and submission. Targets that only exist
at run time (which pending task to cancel, which handler child to kill) are
picked from the sorted candidates by a fraction drawn up front, so the same
seed replays the same schedule, though what each action meets varies with
real timing.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psycopg
import requests

from tests.faults.conftest import Cluster, Fleet
from tests.support import children
from tests.faults.history.ops import OPERATIONS

OPS = sorted(OPERATIONS)
WORKER_SLOTS = {"w1": 3, "w2": 4, "w3": 2}
REQUEST_TIMEOUT_SECONDS = 10.0
# A stopped worker exits within its grace (3 s in FAULT_ENV) plus its start-up and teardown.
EXIT_DEADLINE_SECONDS = 30.0
# Lock holds stay under the worker's lock_timeout (5 s): they slow claims and writes, not fail them.
HOLD_SECONDS = (1.0, 4.0)
# Mean pause between two random actions, on top of one guaranteed action of each kind.
MEAN_ACTION_GAP_SECONDS = 2.5
MEAN_SUBMIT_GAP_SECONDS = 0.4
BURST_CHANCE = 0.12
BURST_SIZE = (6, 16)
# Each worker start draws its ASYNCPROC_SHUTDOWN_GRACE_SECONDS: 1 s cuts most
# long runs short; 10 s outlasts the stalled limit plus a sweep (4 s in FAULT_ENV),
# when other workers may take a stopping worker's tasks.
GRACES = (1.0, 3.0, 10.0)
# Runs are 0-3 s, and a few last long enough to outlive that moment after a SIGTERM.
LONG_RUN_CHANCE = 0.15
LONG_RUN_SECONDS = (4.0, 9.0)
# How often a worker stop aims at the worker with the longest run still ahead, rather than at its drawn slot.
AIM_CHANCE = 0.5
DRIVER_OPTIONS = "-c lock_timeout=3000 -c statement_timeout=8000"

KIND_WEIGHTS = {
    "worker_sigterm": 4,
    "worker_sigterm_twice": 1,
    "worker_sigkill": 3,
    "child_sigkill": 3,
    "api_sigterm": 1,
    "api_sigkill": 1,
    "terminate_backend": 3,
    "pg_restart": 1,
    "lock_task": 2,
    "lock_job": 2,
    "lock_settings": 4,
    "cancel": 3,
    "retry": 3,
    "priority": 2,
    "reschedule": 2,
    "limit_max_running": 2,
    "limit_rate": 2,
    "pause": 2,
    "resume": 2,
    "clear_limit": 1,
    "insert_invalid": 1,
}
# worker/main.py's exit code when a worker ends itself because its lease lapsed
# under handlers only its exit can stop (EX_TEMPFAIL): a supervisor starts it again.
FENCED_EXIT = 75
# The lease connection is new with worker leases; where it is absent the action is skipped.
APPLICATION_NAMES = ["asyncproc-worker", "asyncproc-worker-lease", "asyncproc-api", "asyncproc-api-listener"]


@dataclass
class Action:
    at: float
    kind: str
    args: dict[str, Any]


@dataclass
class Submission:
    at: float
    # One body is a POST /process; several are one POST /process/batch.
    bodies: list[dict[str, Any]]
    # A fraction picking an earlier accepted task to read back, or None.
    read: float | None


@dataclass
class Schedule:
    actions: list[Action]
    submissions: list[Submission]
    # Each first worker's ASYNCPROC_SHUTDOWN_GRACE_SECONDS; restarts carry their own.
    graces: dict[str, float]


def make_schedule(seed: int, seconds: float) -> Schedule:
    rng = random.Random(seed)
    graces = {slot: rng.choice(GRACES) for slot in sorted(WORKER_SLOTS)}
    actions: list[Action] = []
    kinds = list(KIND_WEIGHTS)
    # One of each kind first, so that even a short window sees every fault.
    early, late = min(3.0, seconds / 10), max(seconds - 8.0, seconds * 0.8)
    for kind in kinds:
        actions.append(Action(round(rng.uniform(early, late), 3), kind, {}))
    # Limits on two operations from the start: claims that lock two settings rows can then deadlock.
    for kind in rng.sample(["limit_max_running", "limit_rate", "pause"], 2):
        actions.append(Action(round(rng.uniform(0.5, early), 3), kind, {}))
    at = early
    while True:
        at += rng.expovariate(1 / MEAN_ACTION_GAP_SECONDS)
        if at >= late:
            break
        actions.append(Action(round(at, 3), rng.choices(kinds, [KIND_WEIGHTS[k] for k in kinds])[0], {}))
    actions.sort(key=lambda a: a.at)
    follow_ups = []
    for number, action in enumerate(actions):
        action.args = _args(rng, action.kind)
        if action.at < early and action.kind.startswith(("limit", "pause")):
            # The opening limits go to two different operations.
            taken = {a.args.get("operation") for a in actions if a is not action and a.at < early}
            action.args["operation"] = rng.choice([op for op in OPS if op not in taken])
        if "restart_after" in action.args:
            # `after` names the stop it follows: an aimed stop may have hit another slot than the drawn one.
            action.args["number"] = number
            restart = {"target": "api", "after": number} if action.kind.startswith("api_") else {
                "target": action.args["slot"], "grace": rng.choice(GRACES), "after": number}
            follow_ups.append(Action(round(action.at + action.args["restart_after"], 3), "restart", restart))
    actions = sorted(actions + follow_ups, key=lambda a: a.at)

    submissions = []
    at = 0.0
    while True:
        at += rng.expovariate(1 / MEAN_SUBMIT_GAP_SECONDS)
        if at >= seconds:
            break
        if rng.random() < BURST_CHANCE:
            # A batch of short tasks, committed at once, wakes every worker to fetch
            # several jobs in one statement, of several (limited) operations.
            bodies = [_body(rng, short=True) for _ in range(rng.randint(*BURST_SIZE))]
        else:
            bodies = [_body(rng)]
        submissions.append(Submission(round(at, 3), bodies, rng.random() if rng.random() < 0.5 else None))
    return Schedule(actions, submissions, graces)


def _args(rng: random.Random, kind: str) -> dict[str, Any]:
    pick = round(rng.random(), 6)
    if kind in ("worker_sigterm", "worker_sigkill", "worker_sigterm_twice"):
        args = {"slot": rng.choice(sorted(WORKER_SLOTS)), "restart_after": round(rng.uniform(0.5, 6.0), 3),
                "aim": rng.random() < AIM_CHANCE}
        if kind == "worker_sigterm_twice":
            args["second_after"] = round(rng.uniform(0.2, 2.0), 3)
        return args
    if kind == "child_sigkill":
        return {"slot": rng.choice(sorted(WORKER_SLOTS)), "pick": pick}
    if kind in ("api_sigterm", "api_sigkill"):
        return {"restart_after": round(rng.uniform(0.5, 4.0), 3)}
    if kind == "terminate_backend":
        return {"application_name": rng.choice(APPLICATION_NAMES), "all": rng.random() < 0.3, "pick": pick}
    if kind == "pg_restart":
        return {"down": round(rng.uniform(1.0, 6.0), 3)}
    if kind in ("lock_task", "lock_job"):
        return {"hold": round(rng.uniform(*HOLD_SECONDS), 3), "pick": pick}
    if kind == "lock_settings":
        return {"hold": round(rng.uniform(*HOLD_SECONDS), 3), "operation": rng.choice(OPS)}
    if kind in ("cancel", "retry"):
        return {"pick": pick}
    if kind == "priority":
        return {"pick": pick, "priority": rng.randint(-5, 5)}
    if kind == "reschedule":
        return {"pick": pick, "seconds": round(rng.uniform(-3.0, 8.0), 3)}
    if kind == "limit_max_running":
        return {"operation": rng.choice(OPS), "max_running": rng.randint(1, 3)}
    if kind == "limit_rate":
        return {"operation": rng.choice(OPS), "rate": round(rng.uniform(0.5, 5.0), 3), "burst": rng.randint(1, 3)}
    if kind in ("pause", "resume", "clear_limit", "insert_invalid"):
        return {"operation": rng.choice(OPS)}
    raise AssertionError(f"no arguments for {kind}")


def _body(rng: random.Random, short: bool = False) -> dict[str, Any]:
    plan = []
    for _ in range(rng.randint(1, 3)):
        if short:
            seconds = rng.uniform(0.0, 0.3)
        elif rng.random() < LONG_RUN_CHANCE:
            seconds = rng.uniform(*LONG_RUN_SECONDS)
        else:
            seconds = rng.uniform(0.0, 0.5) if rng.random() < 0.4 else rng.uniform(0.5, 3.0)
        roll = rng.random()
        outcome = "permanent" if roll < 0.03 else "fail" if roll < 0.33 else "ok"
        plan.append([round(seconds, 3), outcome])
    body: dict[str, Any] = {
        "operation": rng.choice(OPS),
        "data": {"plan": plan, "stubborn": rng.random() < 0.3},
        "max_attempts": rng.randint(1, 4),
        "priority": rng.randint(-2, 2),
    }
    if rng.random() < 0.1:
        body["delay_seconds"] = round(rng.uniform(0.0, 3.0), 3)
    return body


@dataclass
class Answer:
    """One HTTP request of the submitter; status 0 is a transport failure (the API was down)."""

    method: str
    path: str
    sent: float
    answered: float
    status: int
    task_ids: list[str]
    detail: str


@dataclass
class Logged:
    at: float
    kind: str
    args: dict[str, Any]
    result: str

    def line(self, origin: float) -> str:
        return f"{self.at - origin:8.3f}s {self.kind} {json.dumps(self.args, sort_keys=True)} -> {self.result}"


class ActionLog:
    def __init__(self, path: Path, origin: float):
        self.origin = origin
        self.entries: list[Logged] = []
        self._lock = threading.Lock()
        self._file = open(path, "a")

    def add(self, kind: str, args: dict[str, Any], result: str, at: float | None = None) -> None:
        entry = Logged(time.time() if at is None else at, kind, args, result)
        with self._lock:
            self.entries.append(entry)
            self._file.write(f"{entry.at:.3f} {entry.line(self.origin)}\n")
            self._file.flush()

    def close(self) -> None:
        self._file.close()


class HistoryTail:
    """The runs that have started and not ended, read as the history file grows."""

    def __init__(self, path: Path):
        self.path = path
        self._offset = 0
        self._partial = b""
        self.open_runs: dict[str, dict] = {}

    def refresh(self) -> dict[str, dict]:
        if not self.path.exists():
            return self.open_runs
        with open(self.path, "rb") as history:
            history.seek(self._offset)
            data = history.read()
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            line = json.loads(raw)
            if line["e"] == "start":
                self.open_runs[line["run"]] = line
            elif line["e"] == "end":
                self.open_runs.pop(line["run"], None)
        return self.open_runs


@dataclass
class Member:
    """One worker slot or the API: its current process and whether we stopped it."""

    name: str
    process: subprocess.Popen | None = None
    generation: int = 0
    signalled: bool = False
    pids: set[int] = field(default_factory=set)
    grace: float = 3.0
    # It ended itself on a lapsed lease, and waits for a restart as a supervisor would give it.
    fenced: bool = False


class FleetControl:
    """Starts, stops and restarts the three workers and the API, and notices unplanned exits."""

    def __init__(self, fleet: Fleet, cluster: Cluster, log: ActionLog):
        self.fleet = fleet
        self.cluster = cluster
        self.log = log
        self.workers = {slot: Member(slot) for slot in WORKER_SLOTS}
        self.api = Member("api")
        self.api_url: str | None = None
        # Exits that nobody asked for: (when, who, exit code).
        self.unplanned_exits: list[tuple[float, str, int]] = []
        # Workers that ended themselves on a lapsed lease: (when, who).
        self.fenced_exits: list[tuple[float, str]] = []
        # Stopped processes that did not exit in time: (when, who).
        self.hung: list[tuple[float, str]] = []
        self.exit_codes: list[tuple[str, int | None]] = []

    def start_worker(self, slot: str, grace: float) -> None:
        member = self.workers[slot]
        member.generation += 1
        name = f"{slot}-{member.generation}"
        member.process = self.fleet.worker(name, concurrency=WORKER_SLOTS[slot],
                                           ASYNCPROC_SHUTDOWN_GRACE_SECONDS=f"{grace:g}")
        member.signalled, member.fenced, member.grace = False, False, grace
        self.log.add("started", {"worker": name, "grace": grace}, f"pid {member.process.pid}")

    def start_api(self) -> None:
        member = self.api
        member.generation += 1
        # fleet.api() always writes api.log: keep the earlier generations' logs.
        current = self.fleet.logs / "api.log"
        if current.exists():
            current.rename(self.fleet.logs / f"api-{member.generation - 1}.log")
        service, process = self.fleet.api()
        member.process, member.signalled = process, False
        member.pids = {process.pid, *children(process.pid)}
        self.api_url = service.base_url
        self.log.add("started", {"api": member.generation}, f"pid {process.pid} at {service.base_url}")

    def members(self) -> list[Member]:
        return [*self.workers.values(), self.api]

    def note_exits(self) -> None:
        """Record processes that exited without being signalled by us."""
        for member in self.members():
            process = member.process
            if process is not None and not member.signalled and process.poll() is not None:
                who = f"{member.name}-{member.generation}"
                member.signalled = True
                if member is not self.api and process.returncode == FENCED_EXIT:
                    member.fenced = True
                    self.fenced_exits.append((time.time(), who))
                    self.log.add("fenced_exit", {"who": who}, f"exit code {FENCED_EXIT}")
                    continue
                self.unplanned_exits.append((time.time(), who, process.returncode))
                self.log.add("unplanned_exit", {"who": who}, f"exit code {process.returncode}")

    def revive_fenced(self) -> None:
        """Start again the workers that fenced themselves, as their supervisor would."""
        self.note_exits()
        for slot, member in self.workers.items():
            if member.fenced:
                self.log.add("revive", {"target": slot}, self.restart(slot, member.grace))

    def up(self, member: Member) -> bool:
        return member.process is not None and not member.signalled and member.process.poll() is None

    def signal(self, member: Member, signum: int) -> str:
        self.note_exits()
        if not self.up(member):
            return "skipped: not running"
        member.signalled = True
        if member is self.api and signum == signal.SIGKILL:
            # A container kill takes the gunicorn workers with their arbiter.
            targets = sorted({member.process.pid, *children(member.process.pid)})
            member.pids = set(targets)
            for pid in targets:
                _kill(pid, signal.SIGKILL)
            return f"SIGKILL pids {targets}"
        member.process.send_signal(signum)
        return f"{signal.Signals(signum).name} pid {member.process.pid}"

    def wait_exit(self, member: Member) -> str:
        process = member.process
        try:
            code = process.wait(EXIT_DEADLINE_SECONDS)
        except subprocess.TimeoutExpired:
            self.hung.append((time.time(), f"{member.name}-{member.generation}"))
            process.kill()
            code = process.wait(10)
            self.exit_codes.append((f"{member.name}-{member.generation}", code))
            return f"did not exit within {EXIT_DEADLINE_SECONDS:g}s; killed"
        self.exit_codes.append((f"{member.name}-{member.generation}", code))
        return f"exited {code}"

    def restart(self, target: str, grace: float = 3.0) -> str:
        self.note_exits()
        member = self.api if target == "api" else self.workers[target]
        if self.up(member):
            return "skipped: still running"
        how = self.wait_exit(member) if member.process is not None else "absent"
        if member is self.api:
            # The orphaned gunicorn workers of a killed arbiter must be gone before a new API starts.
            for pid in member.pids:
                _wait_gone(pid)
            self.start_api()
        else:
            self.start_worker(target, grace)
        return how

    def ensure_up(self) -> None:
        self.note_exits()
        for slot, member in self.workers.items():
            if not self.up(member):
                self.log.add("heal", {"target": slot}, self.restart(slot, member.grace))
        if not self.up(self.api):
            self.log.add("heal", {"target": "api"}, self.restart("api"))

    def stop_all(self) -> None:
        """SIGTERM everything, then wait: every backend exits, which also flushes its statistics."""
        self.note_exits()
        running = [m for m in self.members() if self.up(m)]
        for member in running:
            member.signalled = True
            member.process.send_signal(signal.SIGTERM)
        for member in running:
            self.log.add("final_stop", {"who": f"{member.name}-{member.generation}"}, self.wait_exit(member))


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # already gone, which is what the kill wanted


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + EXIT_DEADLINE_SECONDS
    while Path(f"/proc/{pid}").exists() and _state(pid) != "Z":
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} still alive {EXIT_DEADLINE_SECONDS:g}s after SIGKILL")
        time.sleep(0.05)


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


class DeadlockCounter:
    """pg_stat_database.deadlocks summed across restarts, which may reset the statistics."""

    def __init__(self, url: str):
        self.url = url
        self.total = 0
        self.readings: list[tuple[float, int]] = []
        self._last = self.read()

    def read(self) -> int:
        with psycopg.connect(self.url, connect_timeout=5, application_name="history-stats") as conn:
            value = conn.execute(
                "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
            ).fetchone()[0]
        self.readings.append((time.time(), value))
        return value

    def checkpoint(self) -> None:
        current = self.read()
        self.total += current - self._last if current >= self._last else current
        self._last = current


class Driver:
    """Runs the submissions and the actions of one schedule against the fleet."""

    def __init__(self, seed: int, seconds: float, fleet: Fleet, cluster: Cluster, control: FleetControl,
                 log: ActionLog, deadlocks: DeadlockCounter, history: Path):
        self.seed = seed
        self.seconds = seconds
        self.fleet = fleet
        self.cluster = cluster
        self.control = control
        self.log = log
        self.deadlocks = deadlocks
        self.tail = HistoryTail(history)
        self.schedule = make_schedule(seed, seconds)
        self.actions, self.submissions = self.schedule.actions, self.schedule.submissions
        self.stop = threading.Event()
        self.answers: list[Answer] = []
        # Task ids with the source that created them: "http" (a 2xx) or "psql".
        self.accepted: dict[str, str] = {}
        self.db_down: list[tuple[float, float]] = []
        self.errors: list[BaseException] = []
        # Which slot each aimed stop hit, by the stop's number, for its restart.
        self.stopped: dict[int, str] = {}
        self._lock = threading.Lock()
        self._holds: list[threading.Thread] = []

    # -- running ---------------------------------------------------------------

    def run(self) -> None:
        """Carry out the whole schedule; returns once every action, restart and hold is done."""
        start = time.monotonic()
        threads = [
            threading.Thread(target=self._guard(self._submit_all, start), name="history-submitter"),
            threading.Thread(target=self._guard(self._act_all, start), name="history-actions"),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            # The last restarts and a database outage may run a few seconds past the window.
            while thread.is_alive() and not self.errors:
                thread.join(0.5)
        self.stop.set()
        for thread in threads + self._holds:
            thread.join(REQUEST_TIMEOUT_SECONDS * 3)
            assert not thread.is_alive(), f"{thread.name} did not stop"
        if self.errors:
            raise self.errors[0]

    def _guard(self, target: Callable[[float], None], start: float) -> Callable[[], None]:
        def guarded() -> None:
            try:
                target(start)
            except BaseException as exc:  # handed to the test's thread, which raises it
                self.errors.append(exc)
                self.stop.set()

        return guarded

    def _wait_until(self, start: float, at: float) -> bool:
        """False once the driver is told to stop (an error elsewhere)."""
        delay = start + at - time.monotonic()
        if delay > 0:
            return not self.stop.wait(delay)
        return not self.stop.is_set()

    def _act_all(self, start: float) -> None:
        for action in self.actions:
            if not self._wait_until(start, action.at):
                return
            self.control.revive_fenced()
            at = time.time()
            try:
                result = getattr(self, f"_do_{action.kind}")(action.args)
            except psycopg.Error as exc:
                # The database refusing or being away is an outcome of the action, recorded as such.
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                result = f"error {type(exc).__name__}: {first}"
            self.log.add(action.kind, action.args, result, at=at)

    def _submit_all(self, start: float) -> None:
        session = requests.Session()
        mine: list[str] = []
        for submission in self.submissions:
            if not self._wait_until(start, submission.at):
                return
            if len(submission.bodies) == 1:
                answer = self._request(session, "POST", "/process", json=submission.bodies[0])
            else:
                answer = self._request(session, "POST", "/process/batch", json={"tasks": submission.bodies})
            if 200 <= answer.status < 300:
                mine += answer.task_ids
                with self._lock:
                    self.accepted.update((task_id, "http") for task_id in answer.task_ids)
            if submission.read is not None and mine:
                self._request(session, "GET", f"/results/{mine[int(submission.read * len(mine))]}")

    def _request(self, session: requests.Session, method: str, path: str, **kwargs) -> Answer:
        base = self.control.api_url
        sent = time.time()
        try:
            response = session.request(method, f"{base}{path}", timeout=REQUEST_TIMEOUT_SECONDS, **kwargs)
        except requests.RequestException as exc:
            answer = Answer(method, path, sent, time.time(), 0, [], repr(exc)[:300])
        else:
            task_ids = []
            if method == "POST" and 200 <= response.status_code < 300:
                body = response.json()
                task_ids = [task["task_id"] for task in body["tasks"]] if "tasks" in body else [body["task_id"]]
            answer = Answer(method, path, sent, time.time(), response.status_code, task_ids, response.text[:300])
        with self._lock:
            self.answers.append(answer)
        return answer

    # -- helpers ---------------------------------------------------------------

    def _connect(self, autocommit: bool = True) -> psycopg.Connection:
        return psycopg.connect(self.cluster.url, autocommit=autocommit, connect_timeout=2,
                               application_name="history-driver", options=DRIVER_OPTIONS)

    def _pick(self, sql: str, fraction: float, params: tuple = ()) -> Any:
        with self._connect() as conn:
            rows = [row[0] for row in conn.execute(sql, params).fetchall()]
        return rows[int(fraction * len(rows))] if rows else None

    def _pick_task(self, statuses: tuple[str, ...], fraction: float) -> str | None:
        return self._pick(
            "SELECT task_id::text FROM tasks WHERE status = ANY(%s) ORDER BY task_id", fraction, (list(statuses),)
        )

    def _hold(self, kind: str, sql: str, params: tuple, seconds: float) -> str:
        """Hold row locks for `seconds` in a session of our own, in a thread so the schedule goes on."""

        def hold() -> None:
            try:
                with self._connect(autocommit=False) as conn:
                    rows = conn.execute(sql, params).fetchall()
                    self.log.add(f"{kind}_held", {"params": [str(p) for p in params]}, f"{len(rows)} row(s)")
                    self.stop.wait(seconds)
                    conn.rollback()
                self.log.add(f"{kind}_released", {"params": [str(p) for p in params]}, "ok")
            except psycopg.Error as exc:
                self.log.add(f"{kind}_released", {"params": [str(p) for p in params]}, f"error {type(exc).__name__}: {exc}")
            except BaseException as exc:  # handed to the test's thread, which raises it
                self.errors.append(exc)

        thread = threading.Thread(target=hold, name=f"history-{kind}")
        thread.start()
        self._holds.append(thread)
        return f"holding for {seconds}s"

    # -- the actions -----------------------------------------------------------

    def _do_restart(self, args: dict) -> str:
        target = self.stopped.get(args["after"], args["target"])
        return f"{target}: {self.control.restart(target, args.get('grace', 3.0))}"

    def _target(self, args: dict) -> Member:
        """The drawn slot, or when aiming, the running worker whose open run has the most time left."""
        if args.get("aim"):
            left = {}
            now = time.time()
            by_pid = {m.process.pid: m for m in self.control.workers.values() if self.control.up(m)}
            for run in self.tail.refresh().values():
                ahead = run["t"] + run["seconds"] - now
                if run["wpid"] in by_pid and ahead > 0:
                    left[run["wpid"]] = max(left.get(run["wpid"], 0.0), ahead)
            if left:
                member = by_pid[max(sorted(left), key=lambda pid: left[pid])]
                self.stopped[args["number"]] = member.name
                return member
        return self.control.workers[args["slot"]]

    def _do_worker_sigterm(self, args: dict) -> str:
        member = self._target(args)
        return f"{member.name}: {self.control.signal(member, signal.SIGTERM)}"

    def _do_worker_sigterm_twice(self, args: dict) -> str:
        member = self._target(args)
        first = f"{member.name}: {self.control.signal(member, signal.SIGTERM)}"
        if "skipped" in first:
            return first
        self.stop.wait(args["second_after"])
        if member.process.poll() is not None:
            return f"{first}; exited before the second"
        member.process.send_signal(signal.SIGTERM)
        return f"{first}; SIGTERM again"

    def _do_worker_sigkill(self, args: dict) -> str:
        member = self._target(args)
        return f"{member.name}: {self.control.signal(member, signal.SIGKILL)}"

    def _do_child_sigkill(self, args: dict) -> str:
        member = self.control.workers[args["slot"]]
        if not self.control.up(member):
            return "skipped: worker not running"
        handler_children = set()
        for server in children(member.process.pid):
            handler_children |= children(server)
        busy = {run["pid"] for run in self.tail.refresh().values()} & handler_children
        candidates = sorted(busy or handler_children)
        if not candidates:
            return "skipped: no handler child"
        pid = candidates[int(args["pick"] * len(candidates))]
        _kill(pid, signal.SIGKILL)
        running = [f"{r['task']}#{r['attempt']}" for r in self.tail.open_runs.values() if r["pid"] == pid]
        return f"SIGKILL child {pid} ({'busy: ' + ', '.join(running) if running else 'idle'})"

    def _do_api_sigterm(self, args: dict) -> str:
        return self.control.signal(self.control.api, signal.SIGTERM)

    def _do_api_sigkill(self, args: dict) -> str:
        return self.control.signal(self.control.api, signal.SIGKILL)

    def _do_terminate_backend(self, args: dict) -> str:
        with self._connect() as conn:
            pids = [row[0] for row in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = %s"
                " ORDER BY pid", (args["application_name"],)).fetchall()]
            if not pids:
                return "skipped: no such backend"
            targets = pids if args["all"] else [pids[int(args["pick"] * len(pids))]]
            for pid in targets:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        return f"terminated {targets} of {len(pids)}"

    def _do_pg_restart(self, args: dict) -> str:
        self.deadlocks.checkpoint()
        down = time.time()
        self.cluster.stop()
        self.stop.wait(args["down"])
        self.cluster.start()
        up = time.time()
        with self._lock:
            self.db_down.append((down, up))
        self.deadlocks.checkpoint()
        return f"down {up - down:.1f}s"

    def _do_lock_task(self, args: dict) -> str:
        task_id = self._pick_task(("pending", "running"), args["pick"])
        if task_id is None:
            return "skipped: no pending or running task"
        return self._hold("lock_task", "SELECT task_id FROM tasks WHERE task_id = %s FOR UPDATE", (task_id,), args["hold"])

    def _do_lock_job(self, args: dict) -> str:
        job_id = self._pick("SELECT id FROM procrastinate_jobs WHERE status IN ('todo', 'doing') ORDER BY id", args["pick"])
        if job_id is None:
            return "skipped: no queued or running job"
        return self._hold("lock_job", "SELECT id FROM procrastinate_jobs WHERE id = %s FOR UPDATE", (job_id,), args["hold"])

    def _do_lock_settings(self, args: dict) -> str:
        with self._connect() as conn:
            # A row without limits changes nothing but gives the lock a row to hold.
            conn.execute("INSERT INTO asyncproc_operation_settings (operation) VALUES (%s) ON CONFLICT DO NOTHING",
                         (args["operation"],))
        return self._hold("lock_settings", "SELECT operation FROM asyncproc_operation_settings WHERE operation = %s FOR UPDATE",
                          (args["operation"],), args["hold"])

    def _do_cancel(self, args: dict) -> str:
        task_id = self._pick_task(("pending", "running"), args["pick"])
        if task_id is None:
            return "skipped: no pending or running task"
        with self._connect() as conn:
            rows = conn.execute("SELECT status FROM asyncproc_cancel(%s)", (task_id,)).fetchall()
        return f"{task_id} -> {rows}"

    def _do_retry(self, args: dict) -> str:
        task_id = self._pick_task(("failed", "cancelled"), args["pick"])
        if task_id is None:
            return "skipped: no failed or cancelled task"
        with self._connect() as conn:
            rows = conn.execute("SELECT status, attempts, max_attempts FROM asyncproc_retry(%s)", (task_id,)).fetchall()
        return f"{task_id} -> {rows}"

    def _do_priority(self, args: dict) -> str:
        task_id = self._pick_task(("pending",), args["pick"])
        if task_id is None:
            return "skipped: no pending task"
        with self._connect() as conn:
            done = conn.execute("UPDATE tasks SET priority = %s WHERE task_id = %s AND status = 'pending'",
                                (args["priority"], task_id)).rowcount
        return f"{task_id} updated {done}"

    def _do_reschedule(self, args: dict) -> str:
        task_id = self._pick_task(("pending",), args["pick"])
        if task_id is None:
            return "skipped: no pending task"
        with self._connect() as conn:
            done = conn.execute(
                "UPDATE tasks SET scheduled_at = now() + make_interval(secs => %s) WHERE task_id = %s AND status = 'pending'",
                (args["seconds"], task_id)).rowcount
        return f"{task_id} updated {done}"

    def _settings(self, sql: str, params: tuple) -> str:
        with self._connect() as conn:
            return f"{conn.execute(sql, params).rowcount} row(s)"

    def _do_limit_max_running(self, args: dict) -> str:
        return self._settings(
            "INSERT INTO asyncproc_operation_settings (operation, max_running) VALUES (%s, %s)"
            " ON CONFLICT (operation) DO UPDATE SET max_running = EXCLUDED.max_running",
            (args["operation"], args["max_running"]))

    def _do_limit_rate(self, args: dict) -> str:
        return self._settings(
            "INSERT INTO asyncproc_operation_settings (operation, rate_per_second, burst) VALUES (%s, %s, %s)"
            " ON CONFLICT (operation) DO UPDATE SET rate_per_second = EXCLUDED.rate_per_second, burst = EXCLUDED.burst",
            (args["operation"], args["rate"], args["burst"]))

    def _do_pause(self, args: dict) -> str:
        return self._settings(
            "INSERT INTO asyncproc_operation_settings (operation, paused) VALUES (%s, true)"
            " ON CONFLICT (operation) DO UPDATE SET paused = true", (args["operation"],))

    def _do_resume(self, args: dict) -> str:
        return self._settings("UPDATE asyncproc_operation_settings SET paused = false WHERE operation = %s",
                              (args["operation"],))

    def _do_clear_limit(self, args: dict) -> str:
        return self._settings("DELETE FROM asyncproc_operation_settings WHERE operation = %s", (args["operation"],))

    def _do_insert_invalid(self, args: dict) -> str:
        # No `plan`: the worker refuses the input, a failed attempt with no run.
        with self._connect() as conn:
            task_id = conn.execute("INSERT INTO tasks (operation, payload, max_attempts) VALUES (%s, '{}', 2)"
                                   " RETURNING task_id::text", (args["operation"],)).fetchone()[0]
        with self._lock:
            self.accepted[task_id] = "psql"
        return task_id

    # -- after the window ------------------------------------------------------

    def clear_limits(self) -> None:
        with self._connect() as conn:
            removed = conn.execute("DELETE FROM asyncproc_operation_settings").rowcount
        self.log.add("heal", {"limits": "cleared"}, f"{removed} row(s)")

