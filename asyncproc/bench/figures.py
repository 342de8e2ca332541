"""Each figure of the benchmark, measured once; run.py repeats them and takes medians.

Latencies are in seconds, rates per second. Every HTTP figure talks to the real
API over TCP; the references talk to PostgreSQL directly through psycopg.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from asyncproc import db
from asyncproc.bench import loadgen, siege
from asyncproc.bench.harness import Harness
from asyncproc.bench.plain_worker import QUEUE as PLAIN_QUEUE, TASK_NAME as PLAIN_TASK
from asyncproc.bench.polling import wait_until
from asyncproc.config import CacheSettings, DatabaseSettings, RetentionSettings, Settings

NOOP_BODY = json.dumps({"operation": "bench.noop"}).encode()
BARE_INSERT = "INSERT INTO tasks (operation, payload) VALUES ('bench.noop', '{}') RETURNING task_id"
FINAL = ("completed", "failed", "cancelled")


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def p50_p99(values: list[float]) -> tuple[float, float]:
    return percentile(values, 50), percentile(values, 99)


def _http(h: Harness) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", h.port, timeout=30)


def _call(connection: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    return response.status, response.read()


# -- figure 1: one client at a time --------------------------------------

def post_latency(h: Harness, samples: int) -> list[float]:
    return post_latencies(h.port, samples)


def post_latency_alternating(services: list[Harness], samples: int) -> list[list[float]]:
    """Figure 1 on several services, one request to each in turn; a list of latencies per service."""
    return _post_latencies([h.port for h in services], samples)


def post_latencies(port: int, samples: int) -> list[float]:
    return _post_latencies([port], samples)[0]


def _post_latencies(ports: list[int], samples: int) -> list[list[float]]:
    connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for port in ports]
    latencies: list[list[float]] = [[] for _ in ports]
    for index in range(samples + 10):
        for connection, found in zip(connections, latencies):
            start = time.perf_counter()
            status, body = _call(connection, "POST", "/process", NOOP_BODY)
            elapsed = time.perf_counter() - start
            if status != 202:
                raise RuntimeError(f"POST /process answered {status}: {body[:200]!r}")
            if index >= 10:  # the first requests warm up connections and prepared statements
                found.append(elapsed)
    for connection in connections:
        connection.close()
    return latencies


def insert_latency(h: Harness, samples: int) -> list[float]:
    latencies = []
    with db.connect(h.database_url, h.settings.db, "asyncproc-bench-ref") as conn:
        for index in range(samples + 10):
            start = time.perf_counter()
            conn.execute(BARE_INSERT).fetchone()
            elapsed = time.perf_counter() - start
            if index >= 10:
                latencies.append(elapsed)
    return latencies


# -- figure 2: many connections ------------------------------------------

def post_load(h: Harness, connections: int, seconds: float) -> loadgen.LoadResult:
    request = loadgen.http_request("POST", "127.0.0.1", h.port, "/process", NOOP_BODY)
    result = loadgen.load("127.0.0.1", h.port, request, 202, connections, seconds)
    if result.errors:
        raise RuntimeError(f"{result.errors} POST /process requests failed under load")
    return result


def insert_load(h: Harness, connections: int, seconds: float) -> loadgen.LoadResult:
    kwargs = db.connect_kwargs(h.settings.db, "asyncproc-bench-ref")

    async def client(conn: psycopg.AsyncConnection, deadline: float, result: loadgen.LoadResult) -> None:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            await (await conn.execute(BARE_INSERT)).fetchone()
            result.latencies.append(time.perf_counter() - start)

    async def run() -> loadgen.LoadResult:
        conns = [
            await psycopg.AsyncConnection.connect(h.database_url, autocommit=True, **kwargs)
            for _ in range(connections)
        ]
        result = loadgen.LoadResult()
        try:
            start = time.perf_counter()
            await asyncio.gather(*(client(conn, start + seconds, result) for conn in conns))
            result.seconds = time.perf_counter() - start
        finally:
            for conn in conns:
                await conn.close()
        return result

    return asyncio.run(run())


# -- figure 3: batches ---------------------------------------------------

def batch_rate(h: Harness, requests: int, size: int) -> float:
    body = json.dumps({"tasks": [{"operation": "bench.noop"}] * size}).encode()
    connection = _http(h)
    _call(connection, "POST", "/process/batch", body)  # warm-up
    start = time.perf_counter()
    for _ in range(requests):
        status, answer = _call(connection, "POST", "/process/batch", body)
        if status != 202:
            raise RuntimeError(f"POST /process/batch answered {status}: {answer[:200]!r}")
    elapsed = time.perf_counter() - start
    connection.close()
    return requests * size / elapsed


# -- figure 4: committed -> handler started ------------------------------

def _wait_final(conn: psycopg.Connection, task_id: Any, timeout: float = 30) -> dict[str, Any]:
    def final():
        row = conn.execute("SELECT status, result FROM tasks WHERE task_id = %s", (task_id,)).fetchone()
        return row if row["status"] in FINAL else None

    return wait_until(final, timeout, f"task {task_id} to finish", interval=0.002)


def dispatch_latency(h: Harness, samples: int) -> list[float]:
    """From the moment the INSERT's commit returned to the handler's first line."""
    return dispatch_latency_alternating([h], samples)[0]


def dispatch_latency_alternating(services: list[Harness], samples: int) -> list[list[float]]:
    """dispatch_latency() on several services, one task on each in turn; a list per service."""
    latencies: list[list[float]] = [[] for _ in services]
    conns = [db.connect(h.database_url, h.settings.db, "asyncproc-bench-ref") for h in services]
    try:
        for index in range(samples + 3):
            for conn, found in zip(conns, latencies):
                task_id = conn.execute(
                    "INSERT INTO tasks (operation, payload) VALUES ('bench.stamp', '{}') RETURNING task_id"
                ).fetchone()["task_id"]
                committed = time.time()
                row = _wait_final(conn, task_id)
                if row["status"] != "completed":
                    raise RuntimeError(f"bench.stamp task {task_id} ended {row['status']}")
                if index >= 3:
                    found.append(row["result"] - committed)
    finally:
        for conn in conns:
            conn.close()
    return latencies


# -- figure 5: worker throughput -----------------------------------------

def _drain_rate(h: Harness, committed: float, left_sql: str, end_sql: str, tasks: int) -> float:
    # Polls count what is left, through small index ranges: a poll must cost
    # the same with a million finished rows in the table as with none.
    def done() -> bool:
        return h.conn.execute(left_sql, {"committed": committed, "tasks": tasks}).fetchone()["n"] == 0

    wait_until(done, 600, f"{tasks} no-op tasks to complete", interval=0.02)
    ended = h.conn.execute(end_sql, {"committed": committed}).fetchone()["t"]
    return tasks / (ended - committed)


def worker_rate(h: Harness, tasks: int, operation: str = "bench.noop") -> float:
    """No-op tasks through the whole ledger path, queued in one commit, per second."""
    h.conn.execute(
        "INSERT INTO tasks (operation, payload) SELECT %s, '{}' FROM generate_series(1, %s)", (operation, tasks)
    )
    committed = time.time()
    return _drain_rate(
        h,
        committed,
        "SELECT count(*) AS n FROM tasks WHERE status IN ('pending', 'running')",
        "SELECT extract(epoch FROM max(completed_at))::float8 AS t FROM tasks"
        " WHERE status = 'completed' AND completed_at >= to_timestamp(%(committed)s)",
        tasks,
    )


def backlog_worker_rate(h: Harness, tasks: int) -> float:
    """worker_rate() on top of a backlog (Harness.seed_backlog), which the count of what is left must not read."""
    h.conn.execute("INSERT INTO tasks (operation, payload) SELECT 'bench.noop', '{}' FROM generate_series(1, %s)", (tasks,))
    committed = time.time()
    return _drain_rate(
        h,
        committed,
        "SELECT %(tasks)s - count(*) AS n FROM tasks WHERE completed_at >= to_timestamp(%(committed)s)",
        "SELECT extract(epoch FROM max(completed_at))::float8 AS t FROM tasks"
        " WHERE completed_at >= to_timestamp(%(committed)s)",
        tasks,
    )


def plain_worker_rate(h: Harness, tasks: int) -> float:
    """The same no-op through a plain Procrastinate worker: jobs only, no ledger."""
    h.conn.execute(
        """
        SELECT procrastinate_defer_jobs_v1(ARRAY(
            SELECT ROW(%s, %s, 0, NULL, NULL, '{}'::jsonb, NULL)::procrastinate_job_to_defer_v1
            FROM generate_series(1, %s)))
        """,
        (PLAIN_QUEUE, PLAIN_TASK, tasks),
    )
    committed = time.time()
    return _drain_rate(
        h,
        committed,
        f"SELECT count(*) AS n FROM procrastinate_jobs WHERE queue_name = '{PLAIN_QUEUE}' AND status IN ('todo', 'doing')",
        "SELECT extract(epoch FROM max(at))::float8 AS t FROM procrastinate_events"
        " WHERE type = 'succeeded' AND at >= to_timestamp(%(committed)s)",
        tasks,
    )


# -- figure 10: sustained load -------------------------------------------

@dataclass
class Sustained:
    seconds: float
    accepted: int
    completed: int
    backlog_at_end: int
    drained_after: float | None  # seconds after the end until nothing was left; None if not within the wait


def sustained(h: Harness, connections: int, seconds: float, drain_wait: float) -> Sustained:
    """POST /process from `connections` clients for `seconds` while the workers run; then watch the rest drain."""
    left_sql = "SELECT count(*) AS n FROM tasks WHERE status IN ('pending', 'running')"
    started = time.time()
    result = post_load(h, connections, seconds)
    ended = time.time()
    window = {"started": started, "ended": ended}
    completed = h.conn.execute(
        "SELECT count(*) AS n FROM tasks WHERE completed_at BETWEEN to_timestamp(%(started)s) AND to_timestamp(%(ended)s)",
        window,
    ).fetchone()["n"]
    backlog = h.conn.execute(left_sql).fetchone()["n"]
    drained_after: float | None = None
    deadline = time.monotonic() + drain_wait
    while time.monotonic() < deadline:
        if h.conn.execute(left_sql).fetchone()["n"] == 0:
            drained_after = time.time() - ended
            break
        time.sleep(0.05)
    return Sustained(result.seconds, len(result.latencies), completed, backlog, drained_after)


# -- figure 6: completed -> ?wait answered -------------------------------

def result_latency(h: Harness, samples: int) -> list[float] | None:
    """None when the API answers ?wait before the task is final: it ignores `wait`."""
    connection = _http(h)
    latencies = []
    body = json.dumps({"operation": "sleep", "data": {"seconds": 0.02}}).encode()
    for _ in range(samples):
        status, answer = _call(connection, "POST", "/process", body)
        task_id = json.loads(answer)["task_id"]
        status, answer = _call(connection, "GET", f"/results/{task_id}?wait=10")
        answered = time.time()
        document = json.loads(answer)
        if document["status"] not in FINAL:
            _wait_final(h.conn, task_id)
            connection.close()
            return None
        latencies.append(answered - datetime.fromisoformat(document["completed_at"]).timestamp())
    connection.close()
    return latencies


# -- figure 7: GET /results in process -----------------------------------

def get_latencies(h: Harness, samples: int) -> dict[str, list[float] | None]:
    """Server time of GET /results for a finished task: cache hit, cache miss, Redis off."""
    from asyncproc.api import create_app
    from asyncproc.cache import KEY_PREFIX

    row = h.conn.execute("SELECT task_id FROM tasks WHERE status = 'completed' LIMIT 1").fetchone()
    path = f"/results/{row['task_id']}"
    found: dict[str, list[float] | None] = {"hit": None, "miss": None}
    apps = []
    try:
        if h.redis_url:
            import redis

            cached_app = create_app(Settings(db=DatabaseSettings(url=h.database_url), cache=CacheSettings(url=h.redis_url)))
            apps.append(cached_app)
            client = cached_app.test_client()
            found["hit"] = _timed_gets(client, path, samples)
            evict = redis.Redis.from_url(h.redis_url)
            found["miss"] = _timed_gets(client, path, samples, before=lambda: evict.delete(KEY_PREFIX + str(row["task_id"])))
        plain_app = create_app(Settings(db=DatabaseSettings(url=h.database_url)))
        apps.append(plain_app)
        found["off"] = _timed_gets(plain_app.test_client(), path, samples)
    finally:
        for app in apps:
            app.extensions["asyncproc"].pool.close()
    return found


def _timed_gets(client, path: str, samples: int, before=None) -> list[float]:
    latencies = []
    for index in range(samples + 10):
        if before is not None:
            before()
        start = time.perf_counter()
        response = client.get(path)
        elapsed = time.perf_counter() - start
        if response.status_code != 200:
            raise RuntimeError(f"GET {path} answered {response.status_code}")
        if index >= 10:
            latencies.append(elapsed)
    return latencies


# -- figure 12: POST while many clients wait and many are slow -------------

def post_latency_under_siege(port: int, waiters: int, slow: int, samples: int) -> tuple[list[float], list[float]]:
    """(idle, besieged): POST /process latencies from one client, alone and then
    with `waiters` long polls and `slow` slow clients held open, in one run."""
    idle = post_latencies(port, samples)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    status, body = _call(connection, "POST", "/process", json.dumps({"operation": "bench.noop", "delay_seconds": 3600}).encode())
    connection.close()
    if status != 202:
        raise RuntimeError(f"POST /process answered {status}: {body[:200]!r}")
    with siege.Siege(port, json.loads(body)["task_id"], waiters, slow):
        besieged = post_latencies(port, samples)
    return idle, besieged


# -- figure 11: the ledger at 10M rows ------------------------------------

REPORTING_VIEWS = (
    "asyncproc_status_counts", "asyncproc_throughput_per_minute", "asyncproc_throughput_per_hour",
    "asyncproc_latency_last_hour", "asyncproc_recent_failures", "asyncproc_stuck_tasks", "asyncproc_queue",
)
HISTORY_LAST_MONTH = (
    "SELECT operation, status, sum(count) FROM asyncproc_history"
    " WHERE bucket_start >= now() - interval '30 days' GROUP BY operation, status"
)


def metrics_latency(h: Harness, samples: int) -> list[float]:
    """GET /metrics over HTTP, as Prometheus scrapes it."""
    connection = _http(h)
    latencies = []
    for index in range(samples + 2):
        start = time.perf_counter()
        status, body = _call(connection, "GET", "/metrics")
        elapsed = time.perf_counter() - start
        if status != 200:
            raise RuntimeError(f"GET /metrics answered {status}: {body[:200]!r}")
        if index >= 2:
            latencies.append(elapsed)
    connection.close()
    return latencies


def reporting_latencies(h: Harness, runs: int) -> dict[str, float]:
    """The median time of each reporting view, and of the history question, read in full."""
    found = {}
    for name, sql in [(view, f"SELECT * FROM {view}") for view in REPORTING_VIEWS] + [("asyncproc_history, last 30 days", HISTORY_LAST_MONTH)]:
        h.conn.execute(sql).fetchall()
        timings = []
        for _ in range(runs):
            start = time.perf_counter()
            h.conn.execute(sql).fetchall()
            timings.append(time.perf_counter() - start)
        found[name] = sorted(timings)[len(timings) // 2]
    return found


class Pruning:
    """The real prune pass (asyncproc.retention) run in a thread, as a worker runs it, for
    the duration of the `with` block and at least `min_seconds`."""

    def __init__(self, h: Harness, database: DatabaseSettings, settings: RetentionSettings, min_seconds: float):
        self.h = h
        self.database = database
        self.settings = settings
        self.min_seconds = min_seconds
        self.pruned = 0
        self.seconds = 0.0
        self.busy_seconds = 0.0
        self._began = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self.error: BaseException | None = None

    def __enter__(self) -> "Pruning":
        self._thread = threading.Thread(target=self._run, name="bench-pruner")
        self._thread.start()
        self._started.wait(30)
        return self

    def __exit__(self, *exc_info) -> None:
        time.sleep(max(0.0, self._began + self.min_seconds - time.perf_counter()))
        self._stop.set()
        self._thread.join(60)
        if self.error is not None:
            raise RuntimeError(f"the prune pass failed: {self.error}") from self.error

    def _run(self) -> None:
        try:
            asyncio.run(self._prune())
        except BaseException as exc:  # reported by __exit__ in the bench's thread
            self.error = exc
            self._started.set()

    async def _prune(self) -> None:
        from asyncproc import db, retention

        stopping = asyncio.Event()

        async def relay_stop() -> None:
            # The bench's thread asks through a threading.Event: this loop may have finished already.
            while not self._stop.is_set():
                await asyncio.sleep(0.02)
            stopping.set()

        pool = db.async_pool(self.database, "asyncproc-bench-pruner", 2)
        await pool.open(wait=True)
        relay = asyncio.create_task(relay_stop())
        try:
            self._began = time.perf_counter()
            self._started.set()
            report = await retention.prune_pass(self.settings, pool, stopping)
            self.seconds = time.perf_counter() - self._began
            self.pruned = report.pruned
            self.busy_seconds = report.busy_seconds
        finally:
            relay.cancel()
            await pool.close()

    @property
    def rate(self) -> float:
        return self.pruned / self.seconds if self.seconds else 0.0

    @property
    def busy_rate(self) -> float:
        return self.pruned / self.busy_seconds if self.busy_seconds else 0.0
