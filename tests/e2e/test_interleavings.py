"""The interleaving harness: every writer at once, against the real PostgreSQL, checked against the invariants.

A seeded random schedule runs API submits, batch INSERTs, psql cancels,
retries, UPDATEs of scheduled_at and priority, row locks held in psql, sweeps,
and SIGKILLs and restarts of the workers, all concurrently. A checker samples
the invariants while it runs, and at the end, once every task is final:
  * no task lost: everything accepted exists and ends completed, failed or cancelled;
  * no task ran twice at the same time (each run journals its start and end);
  * attempts never exceed max_attempts, and no task ran more times than its attempts;
  * no deadlock, no 5xx, no error from any writer;
  * the tables agree: no job left for a finished task.

CI runs INTERLEAVING_SEEDS seeds (default 2); set ASYNCPROC_INTERLEAVING_SEEDS
for more, or ASYNCPROC_INTERLEAVING_SEED to replay one. A failure prints its
seed and the schedule each actor ran.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
import requests
from psycopg.rows import dict_row

from asyncproc import db, migrate
from asyncproc.config import Settings
from tests.conftest import free_port, wait_for
from tests.e2e.conftest import _healthy, _start, service_env, stop_processes

pytestmark = pytest.mark.e2e

STALLED_SECONDS = 2
CHAOS_SECONDS = 12
FINAL = ("completed", "failed", "cancelled")


def _seeds() -> list[int]:
    if os.environ.get("ASYNCPROC_INTERLEAVING_SEED"):
        return [int(os.environ["ASYNCPROC_INTERLEAVING_SEED"])]
    return list(range(1, int(os.environ.get("ASYNCPROC_INTERLEAVING_SEEDS", "2")) + 1))


@dataclass
class Run:
    database_url: str
    env: dict[str, str]
    logs: Path
    runs_dir: Path
    base_url: str = ""
    schedule: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    accepted: set[str] = field(default_factory=set)
    killed: dict[int, float] = field(default_factory=dict)
    workers: list[subprocess.Popen] = field(default_factory=list)
    processes: list[subprocess.Popen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def log(self, actor: str, what: str) -> None:
        with self.lock:
            self.schedule.append(f"{time.monotonic():.3f} {actor}: {what}")

    def fail(self, actor: str, what: str) -> None:
        with self.lock:
            self.errors.append(f"{actor}: {what}")

    def start_worker(self) -> None:
        index = len(self.processes)
        process = _start(["worker", "--concurrency", "4"], self.env, self.logs / f"worker-{index}.log")
        self.processes.append(process)
        self.workers.append(process)

    def kill_worker(self, rng: random.Random) -> None:
        victim = self.workers.pop(rng.randrange(len(self.workers)))
        self.killed[victim.pid] = time.time()
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)


def _sql(conn, statement: str, params: tuple = ()) -> list[dict]:
    cursor = conn.execute(statement, params)
    return cursor.fetchall() if cursor.description else []


# Bulk UPDATEs come from one session: two sessions updating overlapping rows in
# different orders deadlock each other on any PostgreSQL table, which is not
# what this harness is about. Each bulk UPDATE races the worker, the sweep,
# the API and the other sessions.
SESSIONS = {
    "psql-bulk": ("bulk cancel", "bulk retry", "reschedule", "reprioritise"),
    "psql-load": ("batch insert", "hold a row"),
    "psql-sweep": ("sweep", "batch insert", "hold a row"),
}


def _operator(run: Run, name: str, rng: random.Random, stop: threading.Event) -> None:
    """One psql session doing what operators do, in random order."""
    actions = {
        "batch insert": lambda c: run.accepted.update(
            row["task_id"] for row in _sql(c,
                "INSERT INTO tasks (operation, payload, max_attempts)"
                " SELECT 'journal', jsonb_build_object('seconds', random() * 0.2, 'fail_attempts', (random() * 2)::int),"
                "        1 + (random() * 2)::int"
                " FROM generate_series(1, %s) RETURNING task_id::text", (rng.randint(5, 40),))),
        "bulk cancel": lambda c: _sql(c, "UPDATE tasks SET status = 'cancelled' WHERE status = 'pending' AND random() < 0.3"),
        "bulk retry": lambda c: _sql(c, "UPDATE tasks SET status = 'pending' WHERE status IN ('failed', 'cancelled') AND random() < 0.3"),
        "reschedule": lambda c: _sql(c,
            "UPDATE tasks SET scheduled_at = now() + (random() * 3 - 1) * interval '1 second'"
            " WHERE status = 'pending' AND random() < 0.3"),
        "reprioritise": lambda c: _sql(c, "UPDATE tasks SET priority = (random() * 10)::int WHERE status = 'pending' AND random() < 0.3"),
        "sweep": lambda c: _sql(c, "SELECT * FROM asyncproc_sweep(%s)", (STALLED_SECONDS,)),
        "hold a row": lambda c: _hold_a_row(c, rng),
    }
    names = SESSIONS[name]
    with psycopg.connect(run.database_url, autocommit=True, row_factory=dict_row) as conn:
        while not stop.is_set():
            action = rng.choice(names)
            run.log(name, action)
            try:
                actions[action](conn)
            except psycopg.Error as exc:
                run.fail(name, f"{action}: {type(exc).__name__}: {exc}")
            time.sleep(rng.uniform(0, 0.15))


def _hold_a_row(conn, rng: random.Random) -> None:
    with conn.transaction():
        _sql(conn, "SELECT 1 FROM tasks WHERE status = 'pending' ORDER BY random() LIMIT 1 FOR UPDATE")
        time.sleep(rng.uniform(0, 0.3))


def _client(run: Run, name: str, rng: random.Random, stop: threading.Event) -> None:
    with requests.Session() as session:
        while not stop.is_set():
            body = {
                "operation": "journal",
                "data": {"seconds": rng.uniform(0, 0.2), "fail_attempts": rng.randint(0, 2)},
                "max_attempts": rng.randint(1, 3),
                "priority": rng.randint(0, 9),
            }
            run.log(name, "submit")
            response = session.post(f"{run.base_url}/process", json=body, timeout=10)
            if response.status_code != 202:
                run.fail(name, f"submit answered {response.status_code}: {response.text[:200]}")
            else:
                with run.lock:
                    run.accepted.add(response.json()["task_id"])
            time.sleep(rng.uniform(0, 0.05))


def _chaos(run: Run, rng: random.Random, stop: threading.Event) -> None:
    while not stop.wait(rng.uniform(0.5, 2.0)):
        if run.workers and rng.random() < 0.6:
            run.log("chaos", "SIGKILL a worker")
            run.kill_worker(rng)
        run.log("chaos", "start a worker")
        run.start_worker()


def _check_while_running(run: Run, stop: threading.Event) -> None:
    with psycopg.connect(run.database_url, autocommit=True, row_factory=dict_row) as conn:
        while not stop.wait(0.3):
            over = _sql(conn, "SELECT task_id, attempts, max_attempts FROM tasks WHERE attempts > max_attempts")
            if over:
                run.fail("checker", f"attempts over max_attempts: {over[:3]}")
            # Two jobs that claimed the same attempt of a running task would be two runs of it.
            # (A job that claimed nothing runs nothing, and one of an earlier attempt is
            # finishing: its outcome is already written.)
            doubled = _sql(conn,
                "SELECT tasks.task_id FROM tasks JOIN procrastinate_jobs AS jobs"
                "  ON jobs.args->>'task_id' = tasks.task_id::text AND jobs.status = 'doing'"
                "  AND (jobs.args->'claimed'->>'attempts')::int = tasks.attempts"
                " WHERE tasks.status = 'running' GROUP BY 1 HAVING count(*) > 1")
            if doubled:
                run.fail("checker", f"two jobs claimed one attempt: {doubled[:3]}")


def _journal(run: Run) -> dict[str, list[tuple[float, float, int]]]:
    """Each task's runs as (start, end, attempt); a run whose process was killed ends at the kill."""
    starts: dict[tuple, dict] = {}
    ends: dict[tuple, float] = {}
    for path in run.runs_dir.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            event = json.loads(line)
            key = (event["task_id"], event["attempt"], event["pid"])
            if event["event"] == "start":
                starts[key] = event
            else:
                ends[key] = event["t"]
    runs: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    for key, event in starts.items():
        # A handler runs in a child of the worker (or of its fork server): a kill of any of them ends it.
        killed = [run.killed[pid] for pid in (event["pid"], *event["ancestors"]) if pid in run.killed]
        end = ends.get(key) or min(killed, default=float("inf"))
        runs[key[0]].append((event["t"], end, key[1]))
    return runs


@pytest.mark.parametrize("seed", _seeds())
def test_every_writer_at_once_keeps_every_invariant(seed, tmp_path, empty_database, redis_url):
    database_url = empty_database()
    with db.connect(database_url) as conn:
        migrate.apply_all(conn, Settings().migrations_dir)
        deadlocks_before = _sql(conn, "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")[0]["deadlocks"]
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    env = service_env(database_url, redis_url, {
        "ASYNCPROC_TEST_RUNS_DIR": str(runs_dir),
        "ASYNCPROC_STALLED_SECONDS": str(STALLED_SECONDS),
        "ASYNCPROC_HEARTBEAT_SECONDS": "0.5",
        "ASYNCPROC_RETRY_BACKOFF_SECONDS": "0.05",
        "ASYNCPROC_SHUTDOWN_GRACE_SECONDS": "2",
    })
    run = Run(database_url=database_url, env=env, logs=tmp_path, runs_dir=runs_dir)
    port = free_port()
    run.base_url = f"http://127.0.0.1:{port}"
    run.processes.append(_start(["api", "--bind", f"127.0.0.1:{port}", "--workers", "2"], env, tmp_path / "api.log"))
    rng = random.Random(seed)
    stop, stop_checker = threading.Event(), threading.Event()
    try:
        wait_for(lambda: _healthy(run.base_url), 30, "the API to start", interval=0.1)
        run.start_worker()
        run.start_worker()
        actors = [
            threading.Thread(target=_client, args=(run, f"client-{i}", random.Random(rng.random()), stop)) for i in range(2)
        ] + [
            threading.Thread(target=_operator, args=(run, name, random.Random(rng.random()), stop)) for name in SESSIONS
        ] + [threading.Thread(target=_chaos, args=(run, random.Random(rng.random()), stop))]
        checker = threading.Thread(target=_check_while_running, args=(run, stop_checker))
        # The schedule runs for CHAOS_SECONDS, then every actor finishes its step and stops.
        threading.Timer(CHAOS_SECONDS, stop.set).start()
        for thread in (*actors, checker):
            thread.start()
        for thread in actors:
            thread.join(CHAOS_SECONDS + 60)

        # Quiesce: a healthy fleet finishes whatever is left.
        run.start_worker()
        with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
            # Retries and schedules in the past only: nothing may be left waiting for an operator.
            _sql(conn, "UPDATE tasks SET scheduled_at = now() WHERE status = 'pending' AND scheduled_at > now()")
            wait_for(
                lambda: not _sql(conn, "SELECT 1 FROM tasks WHERE status NOT IN ('completed', 'failed', 'cancelled') LIMIT 1"),
                STALLED_SECONDS * 4 + 60,
                f"every task to finish (seed {seed}, logs in {tmp_path})",
                interval=0.2,
            )
            _sql(conn, "SELECT * FROM asyncproc_sweep(%s)", (STALLED_SECONDS,))
            stop_checker.set()
            checker.join(10)
            tasks = {row["task_id"]: row for row in _sql(conn,
                "SELECT task_id::text, status, attempts, max_attempts FROM tasks")}
            leftover_jobs = wait_for(
                lambda: _sql(conn, "SELECT count(*) AS n FROM procrastinate_jobs WHERE status IN ('todo', 'doing')")[0]["n"] == 0,
                10, "the finished tasks' jobs to be deleted", interval=0.1,
            )
            deadlocks = _sql(conn, "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")[0]["deadlocks"]
        journal = _journal(run)
        problems = list(run.errors)
        lost = run.accepted - tasks.keys()
        if lost:
            problems.append(f"{len(lost)} accepted task(s) missing: {sorted(lost)[:3]}")
        if deadlocks != deadlocks_before:
            problems.append(f"{deadlocks - deadlocks_before} deadlock(s)")
        for task_id, runs in journal.items():
            runs.sort()
            for (_, end, attempt), (start, _, next_attempt) in zip(runs, runs[1:]):
                if start < end:
                    problems.append(f"task {task_id}: attempt {next_attempt} started while attempt {attempt} ran")
            task = tasks.get(task_id)
            if task and len(runs) > task["attempts"]:
                problems.append(f"task {task_id}: {len(runs)} runs for {task['attempts']} attempt(s)")
        for task_id, task in tasks.items():
            if task["attempts"] > task["max_attempts"]:
                problems.append(f"task {task_id}: attempts {task['attempts']} > max_attempts {task['max_attempts']}")
            if task["status"] == "completed" and not journal.get(task_id):
                problems.append(f"task {task_id}: completed with no run")
        assert leftover_jobs
        assert len(tasks) > 50, f"the schedule ran too little to prove anything ({len(tasks)} tasks)"
        assert not problems, (
            f"seed {seed} broke an invariant (replay: ASYNCPROC_INTERLEAVING_SEED={seed}); logs in {tmp_path}\n"
            + "\n".join(problems[:20]) + "\nschedule:\n" + "\n".join(run.schedule[-200:])
        )
    finally:
        stop.set()
        stop_checker.set()
        stop_processes(run.processes, timeout=20)
