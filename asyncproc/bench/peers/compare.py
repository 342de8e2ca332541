"""`asyncproc bench --peers`: asyncproc and the queues a user would pick instead, measured side by side.

Every system runs the same no-op task on the same PostgreSQL server, each in a
database of its own (Celery: under a key prefix of its own on the bench's
Redis), with its own worker processes, and the rounds alternate the systems:
a moment when the shared machine is slower slows one round of each, not all
the runs of one. Four workloads per system and round:

- drain: tasks preloaded with the workers stopped, then 2 worker processes
  x 10 start; the rate runs from the first completion to the last. CPU per task
  by process from /proc, and commits and written rows per task from
  pg_stat_database, over the same window;
- enqueue: 16 producers, one task per call, no workers;
- pickup: a few tasks a second, from the enqueue call to the handler's first line;
- sustained: 16 producers for a while with the 2 workers running, then the
  backlog left and how long it takes to drain.
"""

from __future__ import annotations

import http.client
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable, Protocol, TextIO
from urllib.parse import quote

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

import asyncproc
from asyncproc.bench import figures
from asyncproc.bench.harness import Harness
from asyncproc.bench.peers import venvs
from asyncproc.bench.polling import wait_until
from asyncproc.config import Settings

WORKERS = 2
CONCURRENCY = 10
PRODUCERS = 16
POLL_SECONDS = 0.05
# pg_stat_database lags: a backend flushes its counts at most once a second, and at exit.
STATS_FLUSH_SECONDS = 1.5
START_TIMEOUT_SECONDS = 120.0
DRAIN_TIMEOUT_SECONDS = 900.0
STOP_TIMEOUT_SECONDS = 30.0
ROLES = ("PostgreSQL", "workers", "API", "Redis")
SECTION = "## Against the queues users would pick instead"
MS = 1000.0


@dataclass(frozen=True)
class Sizes:
    rounds: int
    drain_tasks: int
    enqueue_seconds: float
    pickup_rate: float
    pickup_seconds: float
    sustained_seconds: float

    @classmethod
    def full(cls) -> "Sizes":
        return cls(rounds=3, drain_tasks=20_000, enqueue_seconds=10, pickup_rate=5, pickup_seconds=20,
                   sustained_seconds=30)

    @classmethod
    def quick(cls) -> "Sizes":
        return cls(rounds=1, drain_tasks=500, enqueue_seconds=1, pickup_rate=5, pickup_seconds=2,
                   sustained_seconds=2)


@dataclass
class Drain:
    rate: float
    cpu_ms: dict[str, float]  # CPU per task by process, in ms
    writes: float | None  # commits plus rows inserted, updated and deleted per task; None without PostgreSQL


@dataclass
class Sustained:
    completed_rate: float
    backlog: int
    drained_after: float | None  # seconds after the producers stopped; None if not within the wait


@dataclass
class Figures:
    """One round of one system."""

    drains: dict[str, Drain] = field(default_factory=dict)  # "" for the system's own, or a variant's name
    enqueue: dict[str, float] = field(default_factory=dict)  # the enqueue path -> tasks/s
    pickup: list[float] = field(default_factory=list)
    sustained: Sustained | None = None


class System(Protocol):
    label: str
    version: str

    def measure(self, sizes: Sizes) -> Figures: ...

    def close(self) -> None: ...


# -- CPU per process, from /proc --------------------------------------------

TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state first), or None once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def _cpu_seconds(pid: int) -> float:
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / TICKS if fields else 0.0


def _children() -> dict[int, list[int]]:
    found: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            found.setdefault(int(fields[1]), []).append(int(entry.name))
    return found


def _tree(root: int, children: dict[int, list[int]]) -> list[int]:
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _role(argv: list[str]) -> str | None:
    """Which column a child of the bench is counted in: its workers, asyncproc's API, the bench's Redis."""
    if "worker" in argv:
        return "workers"
    if "api" in argv:
        return "API"
    # redis-server rewrites its title: "redis-server 127.0.0.1:PORT".
    if argv and "redis-server" in argv[0]:
        return "Redis"
    return None


class CpuMeter:
    """CPU seconds by role: the bench's children and their descendants, and the database's backends."""

    def __init__(self, database_url: str | None, poller_pid: int | None, roles: tuple[str, ...]):
        self.database_url = database_url
        self.poller_pid = poller_pid
        self.roles = roles

    def _backends(self) -> list[int]:
        if self.database_url is None:
            return []
        with closing(psycopg.connect(self.database_url, autocommit=True)) as conn:
            rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                                " AND pid <> pg_backend_pid()").fetchall()
        return [pid for (pid,) in rows if pid != self.poller_pid]

    def snapshot(self) -> dict[str, dict[int, float]]:
        children = _children()
        found: dict[str, dict[int, float]] = {}
        for child in children.get(os.getpid(), []):
            role = _role(_argv(child))
            if role in self.roles:
                found.setdefault(role, {}).update({pid: _cpu_seconds(pid) for pid in _tree(child, children)})
        if "PostgreSQL" in self.roles:
            found["PostgreSQL"] = {pid: _cpu_seconds(pid) for pid in self._backends()}
        return found

    @staticmethod
    def per_task(start: dict[str, dict[int, float]], end: dict[str, dict[int, float]], tasks: int) -> dict[str, float]:
        """ms of CPU per task by role; a process that started in between counts from zero."""
        return {role: sum(cpu - start.get(role, {}).get(pid, 0.0) for pid, cpu in pids.items()) / tasks * MS
                for role, pids in end.items()}


def _write_counts(database_url: str) -> int:
    with closing(psycopg.connect(database_url, autocommit=True)) as conn:
        row = conn.execute("SELECT xact_commit + tup_inserted + tup_updated + tup_deleted FROM pg_stat_database"
                           " WHERE datname = current_database()").fetchone()
    return int(row[0])


def drain(tasks: int, database_url: str | None, remaining_sql: str | None, remaining: Callable[[], int] | None,
          start_workers: Callable[[], None], stop_workers: Callable[[], None], roles: tuple[str, ...]) -> Drain:
    """Start the workers on `tasks` preloaded tasks and time them from the first completion to the
    last, then stop them: a backend flushes the last of its pg_stat_database counts when it exits."""
    poll = psycopg.connect(database_url, autocommit=True) if remaining_sql else None
    if poll is not None:
        remaining = lambda: poll.execute(remaining_sql).fetchone()[0]  # noqa: E731
    meter = CpuMeter(database_url, poll.info.backend_pid if poll else None, roles)
    writes_before = _write_counts(database_url) if database_url else 0
    failure: list[BaseException] = []

    def start() -> None:
        try:
            start_workers()
        except BaseException as error:  # noqa: BLE001 - re-raised in the measuring thread
            failure.append(error)

    starter = threading.Thread(target=start, daemon=True)
    polls = 0
    try:
        starter.start()
        deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
        first = cpu_first = None
        while True:
            left = remaining()
            polls += 1
            now = time.time()
            if first is None and left < tasks:
                first, cpu_first = now, meter.snapshot()
            if left == 0:
                break
            if failure:
                raise failure[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"{left} of {tasks} tasks still queued after {DRAIN_TIMEOUT_SECONDS:g}s")
            time.sleep(POLL_SECONDS)
        cpu_last = meter.snapshot()
        starter.join(START_TIMEOUT_SECONDS)
        if failure:
            raise failure[0]
    finally:
        stop_workers()
        if poll is not None:
            poll.close()
    writes = None
    if database_url:
        time.sleep(STATS_FLUSH_SECONDS)
        # The poll's own commits are the bench's, not the system's.
        writes = (_write_counts(database_url) - writes_before - polls) / tasks
    # Between the first poll that saw a completion and the one that saw none left.
    return Drain(tasks / max(now - first, POLL_SECONDS), CpuMeter.per_task(cpu_first, cpu_last, tasks), writes)


def _wait_drained(remaining: Callable[[], int], since: float, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if remaining() == 0:
            return time.time() - since
        time.sleep(POLL_SECONDS)
    return None


def _uri(conninfo: str, dbname: str) -> str:
    """A postgresql:// URI for `conninfo` on database `dbname`: asyncpg takes no key=value strings."""
    params = conninfo_to_dict(conninfo)
    auth = quote(params.get("user", "postgres"), safe="")
    if params.get("password"):
        auth += ":" + quote(params["password"], safe="")
    host, port = params.get("host", "127.0.0.1"), params.get("port", "5432")
    if host.startswith("/"):
        return f"postgresql://{auth}@/{dbname}?host={quote(host, safe='')}&port={port}"
    return f"postgresql://{auth}@{host}:{port}/{dbname}"


# -- asyncproc --------------------------------------------------------------

class Asyncproc:
    """asyncproc itself, through the existing bench's harness: its API, its workers, its database."""

    label = "asyncproc"

    # The bench's no-op operations (asyncproc/bench/operations.py): a sync handler runs in
    # the worker's process pool by default; the same with isolation="thread"; an async one.
    DRAINS = {"": "bench.sync_noop", "thread isolation": "bench.thread_noop", "async handler": "bench.noop"}
    LEFT = "SELECT count(*) AS n FROM tasks WHERE status IN ('pending', 'running')"

    def __init__(self, h: Harness):
        self.h = h
        self.version = asyncproc.__version__
        self.workers: list[subprocess.Popen] = []

    def measure(self, sizes: Sizes) -> Figures:
        found = Figures()
        found.enqueue["SQL INSERT INTO tasks"] = figures.insert_load(self.h, PRODUCERS, sizes.enqueue_seconds).rate
        self.h.reset()
        found.enqueue["HTTP POST /process"] = figures.post_load(self.h, PRODUCERS, sizes.enqueue_seconds).rate
        self.h.reset()
        try:
            for variant, operation in self.DRAINS.items():
                self.h.reset()
                found.drains[variant] = self._drain(sizes.drain_tasks, operation)
            self.workers.extend(self.h.start_workers(WORKERS))
            found.pickup = self._pickup(sizes.pickup_rate, sizes.pickup_seconds)
            result = figures.sustained(self.h, PRODUCERS, sizes.sustained_seconds, drain_wait=DRAIN_TIMEOUT_SECONDS)
            found.sustained = Sustained(result.completed / result.seconds, result.backlog_at_end, result.drained_after)
        finally:
            self._stop_workers()
            self.h.reset()
        return found

    def _drain(self, tasks: int, operation: str) -> Drain:
        with closing(psycopg.connect(self.h.database_url, autocommit=True)) as conn:
            conn.execute("INSERT INTO tasks (operation, payload) SELECT %s, '{}' FROM generate_series(1, %s)",
                         (operation, tasks))
            # Statistics that know the preloaded queue, as for the peers (PeerSystem.analyze).
            conn.execute("ANALYZE tasks, procrastinate_jobs")
        return drain(tasks, self.h.database_url, self.LEFT, None, lambda: self.workers.extend(self.h.start_workers(WORKERS)),
                     self._stop_workers, ROLES)

    def _pickup(self, rate: float, seconds: float) -> list[float]:
        """POST /process of a handler that returns the moment it started, a few a second."""
        body = json.dumps({"operation": "bench.stamp"}).encode()
        connection = http.client.HTTPConnection("127.0.0.1", self.h.port, timeout=30)
        sent: dict[str, float] = {}
        started = time.monotonic()
        try:
            while len(sent) < rate * seconds:
                time.sleep(max(0.0, started + len(sent) / rate - time.monotonic()))
                enqueued_at = time.time()
                connection.request("POST", "/process", body=body, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                answer = response.read()
                if response.status != 202:
                    raise RuntimeError(f"POST /process answered {response.status}: {answer[:200]!r}")
                sent[json.loads(answer)["task_id"]] = enqueued_at
        finally:
            connection.close()
        wait_until(lambda: self.h.conn.execute(self.LEFT).fetchone()["n"] == 0, DRAIN_TIMEOUT_SECONDS,
                   "the pickup tasks to finish", interval=POLL_SECONDS)
        rows = self.h.conn.execute("SELECT task_id::text AS id, result FROM tasks WHERE task_id::text = ANY(%s)",
                                   (list(sent),)).fetchall()
        return [row["result"] - sent[row["id"]] for row in rows]

    def _stop_workers(self) -> None:
        self.h.stop(self.workers)
        self.workers.clear()

    def close(self) -> None:
        self._stop_workers()


# -- the peers ----------------------------------------------------------------

@dataclass(frozen=True)
class PeerQueries:
    remaining: str  # tasks queued or running
    reset: str


PEER_QUERIES = {
    "procrastinate_peer": PeerQueries("SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')",
                                      "TRUNCATE procrastinate_events, procrastinate_jobs CASCADE"),
    "pgqueuer_peer": PeerQueries("SELECT count(*) FROM pgqueuer", "TRUNCATE pgqueuer, pgqueuer_log"),
    "oban_peer": PeerQueries("SELECT count(*) FROM oban_jobs"
                             " WHERE state IN ('available', 'scheduled', 'executing', 'retryable')",
                             "TRUNCATE oban_jobs"),
}
CELERY_QUEUE = "celery"
CELERY_UNACKED = "unacked"


class PeerSystem:
    """One peer: its virtualenv's Python running asyncproc/bench/peers/<peer>.py, and its database."""

    def __init__(self, peer: venvs.Peer, python: Path, h: Harness, workdir: Path):
        self.peer = peer
        self.label = peer.label
        self.version = peer.version
        self.python = python
        self.workdir = workdir
        self.h = h
        self.workers: list[subprocess.Popen] = []
        # Only asyncproc's package on the peer's path: `python -m asyncproc.bench.peers.<peer>`
        # must not see the bench's own site-packages.
        self.path = workdir / "path"
        self.path.mkdir(parents=True, exist_ok=True)
        link = self.path / "asyncproc"
        if not link.exists():
            link.symlink_to(Path(asyncproc.__file__).parent)
        self.queries = PEER_QUERIES.get(peer.name)
        self.database_url: str | None = None
        self.prefix = f"asyncproc-bench-{uuid.uuid4().hex[:8]}:"
        if self.queries is not None:
            name = f"asyncproc_bench_{peer.name}_{uuid.uuid4().hex[:8]}"
            self.h.conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            self.database_url = _uri(self.h.database_url, name)
            self.target = self.database_url
        else:
            if self.h.redis_url is None:
                raise venvs.PeerUnavailable(f"{peer.label}: no Redis (REDIS_URL, or redis-server on PATH)")
            import redis

            self.redis = redis.Redis.from_url(self.h.redis_url)
            self.target = self.h.redis_url
        self._run("install")

    def _command(self, command: str, *arguments: str) -> list[str]:
        return [str(self.python), "-m", f"asyncproc.bench.peers.{self.peer.name}", command, self.target,
                "--prefix", self.prefix, *arguments]

    def _env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(self.path)}

    def _run(self, command: str, *arguments: str) -> dict[str, float]:
        done = subprocess.run(self._command(command, *arguments), env=self._env(), capture_output=True, text=True,
                              timeout=DRAIN_TIMEOUT_SECONDS)
        if done.returncode != 0:
            raise RuntimeError(f"{self.label} {command} exited {done.returncode}: {done.stderr[-2000:]}")
        lines = done.stdout.strip().splitlines()
        return json.loads(lines[-1]) if lines else {}

    def remaining(self) -> int:
        if self.queries is None:
            return self.redis.llen(self.prefix + CELERY_QUEUE) + self.redis.hlen(self.prefix + CELERY_UNACKED)
        with closing(psycopg.connect(self.database_url, autocommit=True)) as conn:
            return conn.execute(self.queries.remaining).fetchone()[0]

    def analyze(self) -> None:
        """Statistics that know the preloaded queue, as autovacuum would soon take them."""
        if self.database_url is not None:
            with closing(psycopg.connect(self.database_url, autocommit=True)) as conn:
                conn.execute("ANALYZE")

    def reset(self) -> None:
        if self.queries is None:
            keys = list(self.redis.scan_iter(match=self.prefix + "*"))
            if keys:
                self.redis.delete(*keys)
            return
        with closing(psycopg.connect(self.database_url, autocommit=True)) as conn:
            conn.execute(self.queries.reset)
            conn.execute("VACUUM ANALYZE")
            conn.execute("CHECKPOINT")

    def _start_workers(self) -> None:
        for index in range(WORKERS):
            with open(self.workdir / f"{self.peer.name}-worker-{index}.log", "ab") as logfile:
                self.workers.append(subprocess.Popen(
                    self._command("worker", "--concurrency", str(CONCURRENCY),
                                  "--ready", str(self.workdir / f"{self.peer.name}-{index}.ready"),
                                  "--record", str(self.workdir / f"{self.peer.name}-{index}.pickup")),
                    env=self._env(), stdout=logfile, stderr=subprocess.STDOUT))

    def _await_workers(self) -> None:
        def ready() -> bool:
            for process in self.workers:
                if process.poll() is not None:
                    raise RuntimeError(f"a {self.label} worker exited; logs in {self.workdir}")
            return all((self.workdir / f"{self.peer.name}-{i}.ready").exists() for i in range(WORKERS))

        wait_until(ready, START_TIMEOUT_SECONDS, f"{WORKERS} {self.label} workers to start", interval=POLL_SECONDS)

    def _stop_workers(self) -> None:
        self.h.stop(self.workers)
        self.workers.clear()
        for path in self.workdir.glob(f"{self.peer.name}-*.ready"):
            path.unlink()

    def measure(self, sizes: Sizes) -> Figures:
        found = Figures()
        self.reset()
        result = self._run("enqueue", "--producers", str(PRODUCERS), "--seconds", str(sizes.enqueue_seconds))
        found.enqueue["its enqueue call"] = result["count"] / result["seconds"]
        self.reset()
        try:
            self._run("preload", "--count", str(sizes.drain_tasks))
            self.analyze()
            if self.queries is None:
                found.drains[""] = drain(sizes.drain_tasks, None, None, self.remaining, self._start_workers,
                                         self._stop_workers, ("workers", "Redis"))
            else:
                found.drains[""] = drain(sizes.drain_tasks, self.database_url, self.queries.remaining, None,
                                         self._start_workers, self._stop_workers, ("PostgreSQL", "workers"))
            self._start_workers()
            self._await_workers()
            found.pickup = self._pickup(sizes)
            result = self._run("enqueue", "--producers", str(PRODUCERS), "--seconds", str(sizes.sustained_seconds))
            backlog = self.remaining()
            found.sustained = Sustained((result["count"] - backlog) / result["seconds"], backlog,
                                        _wait_drained(self.remaining, result["ended"], DRAIN_TIMEOUT_SECONDS))
        finally:
            self._stop_workers()
            self.reset()
        return found

    def _pickup(self, sizes: Sizes) -> list[float]:
        records = [self.workdir / f"{self.peer.name}-{i}.pickup" for i in range(WORKERS)]
        for path in records:
            path.unlink(missing_ok=True)
        result = self._run("paced", "--rate", str(sizes.pickup_rate), "--seconds", str(sizes.pickup_seconds))

        def recorded() -> list[float] | None:
            found = [float(line) for path in records if path.exists() for line in path.read_text().split()]
            return found if len(found) >= result["count"] else None

        return wait_until(recorded, DRAIN_TIMEOUT_SECONDS, f"{self.label}'s pickup tasks to run", interval=POLL_SECONDS)

    def close(self) -> None:
        self._stop_workers()
        if self.database_url is not None:
            name = conninfo_to_dict(self.database_url)["dbname"]
            self.h.conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        else:
            self.reset()


# -- the run and its report -------------------------------------------------------

def _spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    """The median, and min-max when there was more than one run."""
    if not values:
        return "n/a"
    middle = fmt.format(statistics.median(values))
    if len(values) == 1:
        return middle
    return f"{middle} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def _summary(found: Figures) -> str:
    """One round of one system on one line, so that a run cut short still shows what it measured."""
    parts = [f"drain{' ' + name if name else ''} {d.rate:,.0f}/s" for name, d in found.drains.items()]
    parts += [f"enqueue ({path}) {rate:,.0f}/s" for path, rate in found.enqueue.items()]
    if found.pickup:
        parts.append(f"pickup p50 {figures.percentile(found.pickup, 50) * MS:.1f} ms,"
                     f" p99 {figures.percentile(found.pickup, 99) * MS:.1f} ms")
    if found.sustained is not None:
        parts.append(f"sustained {found.sustained.completed_rate:,.0f}/s, {found.sustained.backlog:,} left")
    return "; ".join(parts)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


class Comparison:
    def __init__(self, settings: Settings, sizes: Sizes, out: TextIO):
        self.settings = settings
        self.sizes = sizes
        self.out = out
        self.h = Harness(settings, CONCURRENCY)
        self.workdir = Path(tempfile.mkdtemp(prefix="asyncproc-bench-peers-"))
        self.systems: list[System] = []
        self.skipped: list[str] = []
        self.runs: dict[str, list[Figures]] = {}
        self.setup: list[tuple[str, str]] = []

    def say(self, text: str) -> None:
        print(f"bench --peers: {text}", file=sys.stderr, flush=True)

    def run(self, only: list[str] | None = None) -> int:
        load_at_start = os.getloadavg()
        try:
            self.h.start()
            self.systems.append(Asyncproc(self.h))
            for peer in venvs.peers():
                if only is not None and peer.name.removesuffix("_peer") not in only:
                    continue
                self.say(f"{peer.label} {peer.version}: its virtualenv ({peer.directory})")
                try:
                    self.systems.append(PeerSystem(peer, venvs.ensure(peer), self.h, self.workdir))
                except venvs.PeerUnavailable as error:
                    self.skipped.append(str(error))
                    self.say(f"skipped: {error}")
            self.setup = self._setup(load_at_start)
            for number in range(1, self.sizes.rounds + 1):
                for system in self.systems:
                    self.say(f"round {number}: {system.label}")
                    found = system.measure(self.sizes)
                    self.runs.setdefault(system.label, []).append(found)
                    self.say(f"round {number}: {system.label}: {_summary(found)}")
        finally:
            for system in self.systems:
                system.close()
            self.h.close()
            shutil.rmtree(self.workdir, ignore_errors=True)
        print(self.report(), file=self.out, end="", flush=True)
        return 0

    def _setup(self, load_at_start: tuple[float, float, float]) -> list[tuple[str, str]]:
        conn = self.h.conn
        setting = {name: conn.execute(f"SHOW {name}").fetchone()[name]
                   for name in ("server_version", "fsync", "synchronous_commit", "shared_buffers", "max_connections")}
        versions = ", ".join(f"{s.label} {s.version}" for s in self.systems)
        s = self.sizes
        return [
            ("date", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
            ("systems", versions + (f"; skipped: {'; '.join(self.skipped)}" if self.skipped else "")),
            ("python", f"{platform.python_version()} (Oban for Python: its own 3.12)"),
            ("postgresql", f"{setting['server_version']} ({'DATABASE_URL' if self.settings.db.url else 'embedded'};"
                           f" fsync {setting['fsync']}, synchronous_commit {setting['synchronous_commit']},"
                           f" shared_buffers {setting['shared_buffers']}), a database per system"),
            ("procrastinate (asyncproc's)", metadata.version("procrastinate")),
            ("workers", f"{WORKERS} processes × {CONCURRENCY} (asyncproc: ASYNCPROC_WORKER_CONCURRENCY; PgQueuer:"
                        " batch_size 10; Oban: queue limit 10; Celery: prefork, 10 children)"),
            ("sizes", f"drain {s.drain_tasks:,} tasks; enqueue {PRODUCERS} producers × {s.enqueue_seconds:g} s;"
                      f" pickup {s.pickup_rate:g}/s for {s.pickup_seconds:g} s; sustained {PRODUCERS} producers"
                      f" for {s.sustained_seconds:g} s"),
            ("host", f"{os.cpu_count()} cores, {platform.machine()}, load average at start "
                     + " ".join(f"{load:.2f}" for load in load_at_start)),
            ("rounds", f"{s.rounds}, systems alternating; median (min–max)"),
        ]

    # -- the report --------------------------------------------------------------

    def _values(self, label: str, pick: Callable[[Figures], float | None]) -> list[float]:
        return [value for figures_ in self.runs.get(label, []) if (value := pick(figures_)) is not None]

    def report(self) -> str:
        labels = [s.label for s in self.systems]
        peers = labels[1:]
        lines = ["| setup | |", "|---|---|", *(f"| {name} | {value} |" for name, value in self.setup), ""]
        lines += ["| figure | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]

        def row(name: str, pick: Callable[[Figures], float | None], fmt: str = "{:,.0f}") -> None:
            lines.append(f"| {name} | " + " | ".join(_spread(self._values(label, pick), fmt) for label in labels) + " |")

        row(f"drain {self.sizes.drain_tasks:,} preloaded, tasks/s",
            lambda f: f.drains[""].rate if "" in f.drains else None)
        for variant in Asyncproc.DRAINS:
            if variant:
                row(f"drain, asyncproc with {variant}, tasks/s", lambda f, v=variant: f.drains[v].rate if v in f.drains else None)
        row("enqueue, 16 producers, its own call, tasks/s", lambda f: f.enqueue.get("its enqueue call"))
        row("enqueue, 16 producers, SQL INSERT INTO tasks, tasks/s", lambda f: f.enqueue.get("SQL INSERT INTO tasks"))
        row("enqueue, 16 producers, HTTP POST /process, tasks/s", lambda f: f.enqueue.get("HTTP POST /process"))
        row("pickup p50, ms", lambda f: figures.percentile(f.pickup, 50) * MS if f.pickup else None, "{:,.1f}")
        row("pickup p99, ms", lambda f: figures.percentile(f.pickup, 99) * MS if f.pickup else None, "{:,.1f}")
        row("sustained: completed/s", lambda f: f.sustained.completed_rate if f.sustained else None)
        row("sustained: backlog left at the end", lambda f: f.sustained.backlog if f.sustained else None)
        row("sustained: backlog drained after, s",
            lambda f: f.sustained.drained_after if f.sustained else None, "{:,.1f}")
        lines += ["", "CPU per drained task, ms, and pg_stat_database commits + rows written per task:", ""]
        roles = ROLES
        lines += ["| system | " + " | ".join(roles) + " | commits + rows per task |", "|---|" + "---|" * (len(roles) + 1)]
        for label in labels:
            for variant in (Asyncproc.DRAINS if label == labels[0] else {"": ""}):
                name = f"{label}, {variant}" if variant else label
                cells = [_spread(self._values(label, lambda f, r=role, v=variant: f.drains[v].cpu_ms.get(r)
                                              if v in f.drains else None), "{:.2f}") for role in roles]
                writes = _spread(self._values(label, lambda f, v=variant: f.drains[v].writes
                                              if v in f.drains else None), "{:.1f}")
                lines.append(f"| {name} | " + " | ".join(cells) + f" | {writes} |")
        lines += ["", "| target | measured | | |", "|---|---|---|---|", *self._targets(labels[0], peers)]
        return "\n".join(lines) + "\n"

    def _median(self, label: str, pick: Callable[[Figures], float | None]) -> float | None:
        values = self._values(label, pick)
        return statistics.median(values) if values else None

    def _best(self, labels: list[str], pick: Callable[[Figures], float | None], lowest: bool = False) -> tuple[str, float] | None:
        found = [(label, value) for label in labels if (value := self._median(label, pick)) is not None]
        if not found:
            return None
        return (min if lowest else max)(found, key=lambda pair: pair[1])

    def _targets(self, ours: str, peers: list[str]) -> list[str]:
        rows = []

        def target(name: str, mine: float | None, best: tuple[str, float] | None, factor: float, lowest: bool = False,
                   fmt: str = "{:,.0f}") -> None:
            if mine is None or best is None:
                rows.append(f"| {name} | n/a | no peer measured | |")
                return
            ok = mine <= best[1] * factor if lowest else mine >= best[1] * factor
            rows.append(f"| {name} | {fmt.format(mine)} | {best[0]} {fmt.format(best[1])} | {_verdict(ok)} |")

        drain_rate = lambda f: f.drains[""].rate if "" in f.drains else None  # noqa: E731
        modern = [label for label in peers if label in ("PgQueuer", "Oban (Python)")]
        target("drain ≥ 1.0× the better of PgQueuer and Oban", self._median(ours, drain_rate),
               self._best(modern, drain_rate), 1.0)
        peer_enqueue = self._best(peers, lambda f: f.enqueue.get("its enqueue call"))
        target("SQL enqueue ≥ 1.0× the best peer's", self._median(ours, lambda f: f.enqueue.get("SQL INSERT INTO tasks")),
               peer_enqueue, 1.0)
        target("POST /process ≥ 0.8× the best peer's enqueue",
               self._median(ours, lambda f: f.enqueue.get("HTTP POST /process")), peer_enqueue, 0.8)
        completed = lambda f: f.sustained.completed_rate if f.sustained else None  # noqa: E731
        target("sustained completed/s ≥ 1.0× the best peer's", self._median(ours, completed),
               self._best(peers, completed), 1.0)
        drained = self._values(ours, lambda f: f.sustained.drained_after if f.sustained else None)
        all_drained = bool(drained) and len(drained) == len(self.runs.get(ours, []))
        rows.append(f"| sustained: asyncproc's backlog drains within 5 s | {_spread(drained, '{:,.1f}')} s | |"
                    f" {_verdict(all_drained and statistics.median(drained) <= 5.0)} |")
        for pct in (50, 99):
            pick = lambda f, p=pct: figures.percentile(f.pickup, p) * MS if f.pickup else None  # noqa: E731
            target(f"pickup p{pct} ≤ the best peer's, ms", self._median(ours, pick), self._best(peers, pick, lowest=True),
                   1.0, lowest=True, fmt="{:,.1f}")
        return rows


def write_docs_section(report: str, path: Path) -> None:
    """Put the report under SECTION in docs/performance.md, replacing the previous one; other sections stay."""
    text = path.read_text()
    start = text.find(SECTION)
    if start == -1:
        raise ValueError(f"{path} has no section {SECTION!r}")
    body_start = text.index("\n", start) + 1
    marker_start = text.find("<!-- peers report -->", body_start)
    marker_end = text.find("<!-- /peers report -->", body_start)
    if marker_start == -1 or marker_end == -1:
        raise ValueError(f"{path}'s section {SECTION!r} has no <!-- peers report --> markers")
    path.write_text(text[:marker_start] + "<!-- peers report -->\n" + report + text[marker_end:])


def run(settings: Settings, quick: bool, out: TextIO = sys.stdout, only: list[str] | None = None,
        output: str | None = None, docs: str | None = None) -> int:
    comparison = Comparison(settings, Sizes.quick() if quick else Sizes.full(), out)
    status = comparison.run(only)
    report = comparison.report()
    if output is not None:
        Path(output).write_text(report, encoding="utf-8")
    if docs is not None:
        write_docs_section(report, Path(docs))
    return status
