"""Fault-injection fixtures: a PostgreSQL and a Redis that each test owns.

Fault tests stop, restart and cut these servers, so they never use the shared
DATABASE_URL or REDIS_URL: every test gets a throwaway embedded cluster and a
redis-server on a free port, both restartable on the same port.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import psycopg
import pytest
import redis

from asyncproc import db, migrate
from asyncproc.config import Settings
from asyncproc.embedded import EmbeddedPostgres
from tests.conftest import free_port, wait_for
from tests.e2e.conftest import Service, _healthy, _start, stop_processes
from tests.faults.proxy import SilentProxy
from tests.support import children

# Small enough that a test sees every recovery path within seconds.
FAULT_ENV = {
    "ASYNCPROC_COMPUTE_SECONDS": "0",
    "ASYNCPROC_RETRY_BACKOFF_SECONDS": "0.1",
    "ASYNCPROC_WORKER_POLL_SECONDS": "0.2",
    "ASYNCPROC_SHUTDOWN_GRACE_SECONDS": "3",
    "ASYNCPROC_STALLED_SECONDS": "3",
    "ASYNCPROC_HEARTBEAT_SECONDS": "1",
    "ASYNCPROC_DB_CONNECT_TIMEOUT": "2",
    "ASYNCPROC_LOG_LEVEL": "INFO",
}


@dataclass
class Cluster:
    """A throwaway PostgreSQL holding one migrated database."""

    server: EmbeddedPostgres
    url: str

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        port = self.server.port
        self.server.start()
        assert self.server.port == port, "the cluster must come back on the same port"

    def query(self, sql: str, params: dict | tuple | None = None) -> list[dict]:
        with db.connect(self.url) as conn:
            return conn.execute(sql, params).fetchall()

    def tasks(self, task_ids: list[str] | None = None) -> dict[str, dict]:
        """Each task's status and attempts, by id (all tasks when ids is None)."""
        rows = self.query(
            "SELECT task_id::text AS task_id, status, attempts FROM tasks"
            " WHERE %(all)s OR task_id::text = ANY(%(ids)s)",
            {"all": task_ids is None, "ids": task_ids or []},
        )
        return {row["task_id"]: row for row in rows}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    server = EmbeddedPostgres(tmp_path / "pg", durable=False)
    server.start()
    try:
        url = server.ensure_database("asyncproc")
        with db.connect(url) as conn:
            migrate.apply_all(conn, Settings().migrations_dir)
        yield Cluster(server, url)
    finally:
        server.stop()
        shutil.rmtree(tmp_path / "pg", ignore_errors=True)


@dataclass
class RedisServer:
    """A redis-server of the test's own, restartable on the same port."""

    binary: str
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=2)

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        client = self.client()

        def pong() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_for(pong, 10, "redis-server to start", interval=0.05)

    def stop(self) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait(10)
        self.process = None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("fault tests need redis-server on PATH")
    server = RedisServer(binary)
    server.start()
    yield server
    if server.process is not None:
        server.stop()


@dataclass
class Fleet:
    """The API and worker processes of one test, each started on demand."""

    logs: Path
    database_url: str
    redis_url: str | None
    overrides: dict[str, str] = field(default_factory=dict)
    processes: list[subprocess.Popen] = field(default_factory=list)

    def env(self, **overrides: str) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if key not in ("DATABASE_URL", "REDIS_URL")}
        env.update(FAULT_ENV, DATABASE_URL=self.database_url)
        env.update(self.overrides)
        env.update(overrides)
        if self.redis_url:
            env["REDIS_URL"] = self.redis_url
        return env

    def api(self, **overrides: str) -> tuple[Service, subprocess.Popen]:
        port = free_port()
        process = _start(["api", "--bind", f"127.0.0.1:{port}", "--workers", "2"], self.env(**overrides), self.logs / "api.log")
        self.processes.append(process)
        service = Service(base_url=f"http://127.0.0.1:{port}", logs=self.logs)
        wait_for(lambda: _healthy(service.base_url), 30, f"the API to answer /health (logs in {self.logs})", interval=0.1)
        wait_for(lambda: len(children(process.pid)) == 2, 30, "both gunicorn workers to start", interval=0.1)
        return service, process

    def worker(self, name: str, concurrency: int = 4, **overrides: str) -> subprocess.Popen:
        process = _start(["worker", "--concurrency", str(concurrency)], self.env(**overrides), self.logs / f"{name}.log")
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        stop_processes(self.processes)


@pytest.fixture
def proxy(cluster: Cluster) -> Iterator[SilentProxy]:
    """A TCP proxy to the cluster that can go silent (no FIN, no RST), as a partition does."""
    running = SilentProxy(cluster.server.port).start()
    yield running
    running.stop()


@pytest.fixture
def fleet(tmp_path: Path, cluster: Cluster, redis_server: RedisServer) -> Iterator[Fleet]:
    running = Fleet(logs=tmp_path, database_url=cluster.url, redis_url=redis_server.url)
    yield running
    running.stop_all()


def database_ready(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=1):
            return True
    except psycopg.OperationalError:
        return False
