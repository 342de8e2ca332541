"""The service under test: a database of its own, Redis, the API and workers as real processes."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from asyncproc import db, migrate
from asyncproc.bench.polling import wait_until
from asyncproc.config import Settings
from asyncproc.embedded import EmbeddedPostgres, free_port

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0
SEED_REQUEST_ID = "bench-seed"
BACKLOG_REQUEST_ID = "bench-backlog"



class Harness:
    """Owns every process and database the benchmark starts, and removes them in close()."""

    def __init__(self, settings: Settings, concurrency: int, server_url: str | None = None,
                 server_settings: dict[str, str] | None = None):
        """`server_settings` go to the embedded PostgreSQL it starts when there is no server_url or DATABASE_URL."""
        self.settings = settings
        self.server_settings = server_settings
        self.concurrency = concurrency
        self.workdir = Path(tempfile.mkdtemp(prefix="asyncproc-bench-"))
        self._embedded: EmbeddedPostgres | None = None
        self._server_url = server_url
        self._redis: subprocess.Popen | None = None
        self._api: subprocess.Popen | None = None
        self.database_url = ""
        self.redis_url: str | None = settings.cache.url
        self.port = free_port()
        self.conn: psycopg.Connection | None = None

    # -- start and stop -------------------------------------------------

    def start(self) -> None:
        if self._server_url is None and self.settings.db.url:
            self._server_url = self.settings.db.url
        elif self._server_url is None:
            # Durable: fsync and synchronous_commit stay on, as in production.
            self._embedded = EmbeddedPostgres(self.workdir / "postgres", durable=True, server_settings=self.server_settings)
            self._embedded.start()
            self._server_url = self._embedded.admin_url()
        name = f"asyncproc_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self._server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.database_url = make_conninfo(self._server_url, dbname=name)
        self.conn = db.connect(self.database_url, self.settings.db, "asyncproc-bench")
        migrate.apply_all(self.conn, self.settings.migrations_dir)
        if self.redis_url is None and shutil.which("redis-server"):
            self._start_redis()
        self.restart_api()

    def twin(self) -> "Harness":
        """A second service, started, on the same PostgreSQL server and Redis, with a
        database, an API and workers of its own; the caller closes it.

        The reference of the figures that compare a loaded table with an empty one:
        measured in alternation with this harness, a moment when the machine is
        slower slows both alike, where a reference taken minutes earlier differed
        by 20 % from run to run on a shared 2-core machine.
        """
        twin = Harness(replace(self.settings, cache=replace(self.settings.cache, url=self.redis_url)), self.concurrency, self._server_url)
        twin.start()
        return twin

    def close(self) -> None:
        if self._api is not None:
            self.stop([self._api])
        if self._redis is not None:
            self._redis.terminate()
            self._redis.wait(STOP_TIMEOUT_SECONDS)
        if self.conn is not None:
            self.conn.close()
        if self._server_url and self.database_url:
            name = conninfo_to_dict(self.database_url)["dbname"]
            with psycopg.connect(self._server_url, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        if self._embedded is not None:
            self._embedded.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def restart_api(self, env: dict[str, str] | None = None) -> None:
        """(Re)start the API on the same port, with `env` over the harness's environment."""
        if self._api is not None:
            self.stop([self._api])
        self._api = self._spawn(
            ["api", "--bind", f"127.0.0.1:{self.port}", "--workers", str(self.settings.api.workers)], "api", env
        )
        wait_until(self._api_answers, START_TIMEOUT_SECONDS, "the API to answer /health", interval=0.1)

    def _start_redis(self) -> None:
        port = free_port()
        self._redis = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        import redis

        client = redis.Redis.from_url(self.redis_url)

        def pong() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_until(pong, START_TIMEOUT_SECONDS, "redis-server to start")

    def _env(self) -> dict[str, str]:
        env = {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "ASYNCPROC_OPERATIONS_MODULE": "asyncproc.bench.operations",
            "ASYNCPROC_API_THREADS": str(self.settings.api.threads),
            "ASYNCPROC_LOG_LEVEL": self.settings.log_level,
            # The workers' pruners would delete figure 11's seeded rows while
            # other figures are measured; the bench prunes when it means to.
            "ASYNCPROC_RETAIN_COMPLETED": "forever",
            "ASYNCPROC_RETAIN_FAILED": "forever",
            "ASYNCPROC_RETAIN_CANCELLED": "forever",
        }
        env.pop("REDIS_URL", None)
        if self.redis_url:
            env["REDIS_URL"] = self.redis_url
        return env

    def _spawn(self, arguments: list[str], label: str, env: dict[str, str] | None = None,
               profile: Path | None = None) -> subprocess.Popen:
        """`profile`: run the process under cProfile, by CPU time, which writes its statistics there when it exits."""
        command = ["asyncproc.cli"] if profile is None else ["asyncproc.bench.cpu_profile", str(profile)]
        with open(self.workdir / f"{label}.log", "ab") as logfile:
            return subprocess.Popen(
                [sys.executable, "-m", *command, *arguments],
                env={**self._env(), **(env or {})},
                stdout=logfile,
                stderr=subprocess.STDOUT,
            )

    def _api_answers(self) -> bool:
        import http.client

        if self._api is not None and self._api.poll() is not None:
            raise RuntimeError(f"the API exited; see {self.workdir / 'api.log'}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
            connection.request("GET", "/health")
            return connection.getresponse().status == 200
        except OSError:
            return False

    def _registered_workers(self) -> int:
        return self.conn.execute("SELECT count(*) AS n FROM procrastinate_workers").fetchone()["n"]

    def start_workers(self, count: int, plain: bool = False, profile_dir: Path | None = None) -> list[subprocess.Popen]:
        """Start `count` worker processes and wait until each has registered with Procrastinate.

        `profile_dir`: each worker runs under cProfile and writes worker-N.prof there when it stops."""
        before = self._registered_workers()
        processes = []
        for index in range(count):
            if plain:
                label = f"plain-worker-{index}"
                with open(self.workdir / f"{label}.log", "ab") as logfile:
                    processes.append(
                        subprocess.Popen(
                            [sys.executable, "-m", "asyncproc.bench.plain_worker", self.database_url, str(self.concurrency)],
                            env=self._env(),
                            stdout=logfile,
                            stderr=subprocess.STDOUT,
                        )
                    )
            else:
                profile = profile_dir / f"worker-{index}.prof" if profile_dir is not None else None
                processes.append(
                    self._spawn(["worker", "--concurrency", str(self.concurrency)], f"worker-{index}", profile=profile)
                )

        def registered() -> bool:
            for process in processes:
                if process.poll() is not None:
                    raise RuntimeError(f"a worker exited at start-up; logs in {self.workdir}")
            return self._registered_workers() >= before + count

        wait_until(registered, START_TIMEOUT_SECONDS, f"{count} worker(s) to register", interval=0.05)
        return processes

    def stop(self, processes: list[subprocess.Popen]) -> None:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                log.warning("pid %s did not stop in time; killing it", process.pid)
                process.kill()
                process.wait()

    # -- database state -------------------------------------------------

    def reset(self) -> None:
        """Remove every task and job the figures made; seeded finished rows stay."""
        self.conn.execute("DELETE FROM tasks WHERE request_id IS DISTINCT FROM %s", (SEED_REQUEST_ID,))
        self.conn.execute("TRUNCATE procrastinate_events, procrastinate_jobs CASCADE")
        self.conn.execute("VACUUM ANALYZE tasks")
        # Flush now what this figure wrote, so the next one does not pay for it
        # in a checkpoint that lands in the middle of its measurement.
        self.conn.execute("CHECKPOINT")

    def seed_finished(self, rows: int) -> float:
        """Insert `rows` completed tasks fast, bypassing the triggers; returns the seconds it took."""
        start = time.perf_counter()
        with self.conn.transaction():
            # Triggers off for this transaction only: the rows are already
            # finished and need no dispatch job, and it is ten times faster.
            self.conn.execute("SET LOCAL session_replication_role = replica")
            self.conn.execute(
                """
                INSERT INTO tasks (operation, payload, status, result, attempts, progress, created_at,
                                   scheduled_at, started_at, completed_at, updated_at, request_id)
                SELECT 'bench.noop', '{}', 'completed', 'null', 1, 100, t, t, t, t, t, %s
                FROM (SELECT now() - make_interval(secs => i) AS t FROM generate_series(1, %s) AS i) AS s
                """,
                (SEED_REQUEST_ID, rows),
            )
        self.conn.execute("SELECT asyncproc_recount()")
        self.conn.execute("VACUUM ANALYZE tasks")
        self.conn.execute("CHECKPOINT")
        return time.perf_counter() - start

    def seed_ledger(self, rows: int) -> float:
        """A month of history, `rows` finished tasks of four operations (2 % failed), loaded
        with triggers off; the counts and the history are then rebuilt from them, as after
        any bulk load. Returns the seconds it took."""
        start = time.perf_counter()
        with self.conn.transaction():
            self.conn.execute("SET LOCAL session_replication_role = replica")
            self.conn.execute(
                """
                INSERT INTO tasks (operation, payload, status, result, error_message, attempts, created_at,
                                   scheduled_at, started_at, completed_at, updated_at, request_id)
                SELECT (ARRAY['bench.noop', 'bench.a', 'bench.b', 'bench.c'])[1 + i %% 4], '{}',
                       CASE WHEN i %% 50 = 0 THEN 'failed' ELSE 'completed' END,
                       CASE WHEN i %% 50 <> 0 THEN to_jsonb(i) END, CASE WHEN i %% 50 = 0 THEN 'boom' END,
                       1, t, t, t + interval '2 ms', t + interval '20 ms', t + interval '20 ms', %(seed)s
                FROM generate_series(1, %(rows)s) AS i,
                     LATERAL (SELECT now() - interval '1 hour' - i * interval '30 days' / %(rows)s) AS s(t)
                """,
                {"seed": SEED_REQUEST_ID, "rows": rows},
            )
            self.conn.execute("SELECT asyncproc_recount(with_history => true)")
        self.conn.execute("SELECT asyncproc_compact()")
        self.conn.execute("VACUUM ANALYZE tasks")
        self.conn.execute("CHECKPOINT")
        return time.perf_counter() - start

    def remove_seed(self) -> None:
        self.conn.execute("TRUNCATE tasks")

    def seed_backlog(self, rows: int) -> float:
        """Queue `rows` more pending tasks, each with its job, and never ANALYZE; returns the seconds it took.

        Real queued jobs, as the insert trigger makes them (asyncproc_defer_jobs),
        written by one INSERT each with the triggers off for speed. They wait a
        day at the lowest priority, so that the workers of figures 4 and 5 take
        the figure's own tasks first and never start on the backlog, while every
        fetch, insert and deferral still runs against the whole of it.
        """
        start = time.perf_counter()
        with self.conn.transaction():
            self.conn.execute("SET LOCAL session_replication_role = replica")
            self.conn.execute(
                """
                WITH queued AS (
                    INSERT INTO tasks (operation, payload, priority, scheduled_at, request_id)
                    SELECT 'bench.noop', '{}', -1, now() + interval '1 day', %s FROM generate_series(1, %s)
                    RETURNING task_id, priority, scheduled_at
                )
                INSERT INTO procrastinate_jobs (queue_name, task_name, priority, queueing_lock, args, scheduled_at)
                SELECT 'asyncproc', 'asyncproc.run_task', priority, task_id::text,
                       jsonb_build_object('task_id', task_id), scheduled_at
                FROM queued
                """,
                (BACKLOG_REQUEST_ID, rows),
            )
        self.conn.execute("CHECKPOINT")
        return time.perf_counter() - start

    def remove_figure_tasks(self) -> None:
        """Remove what a figure queued on top of the backlog, keeping the backlog and its statistics."""
        self.conn.execute("DELETE FROM tasks WHERE request_id IS DISTINCT FROM %s", (BACKLOG_REQUEST_ID,))
        self.conn.execute("DELETE FROM procrastinate_jobs WHERE priority <> -1 OR status <> 'todo'")
        self.conn.execute("TRUNCATE procrastinate_events")
        # The twin empties its tables with TRUNCATE; these deletions leave dead
        # rows instead (figure 9's enqueue rows leave 70,000), whose index
        # entries sit at the head of the queue, where every fetch starts: 0.2 ms
        # per dispatch until a vacuum. VACUUM without ANALYZE: the backlog's
        # statistics stay never taken.
        self.conn.execute("VACUUM tasks, procrastinate_jobs")
        self.conn.execute("CHECKPOINT")
