"""`asyncproc bench --profile`: where one task's time goes, end to end.

Drains of no-op tasks with 2 worker processes x 10, as `bench --peers` runs
them, once per handler isolation, and for each:

- CPU per task by process (PostgreSQL's backends, the workers with their
  handler processes, the API, Redis), from /proc;
- what PostgreSQL wrote per task (WAL bytes, rows, commits), which does not
  move with the load on a shared machine the way CPU and time do;
- PostgreSQL's time per task by statement, nested ones included (the claim's
  and the triggers'), from pg_stat_statements, and by function from
  pg_stat_user_functions. The embedded PostgreSQL the bench starts loads
  pg_stat_statements; a server given by DATABASE_URL is used as it is, and
  the statement table says when it does not have it;
- the worker's CPU by step and by library, from a further drain of the async
  handler with the workers under cProfile timed by their main thread's CPU
  clock (asyncproc/bench/cpu_profile.py). cProfile slows Python code, so the
  table gives each step's share of the profiled CPU, and the time it stands
  for in the unprofiled drain's CPU per task.
"""

from __future__ import annotations

import pstats
import sys
import tempfile
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from asyncproc.bench.harness import Harness
from asyncproc.bench.peers import compare
from asyncproc.config import Settings

WORKERS = compare.WORKERS
CONCURRENCY = compare.CONCURRENCY
TASKS = 20_000
QUICK_TASKS = 500
ISOLATIONS = {
    "process (a sync handler's default)": "bench.sync_noop",
    "thread": "bench.thread_noop",
    "async handler": "bench.noop",
}
SERVER_SETTINGS = {
    "shared_preload_libraries": "pg_stat_statements",
    "pg_stat_statements.track": "all",
    "pg_stat_statements.max": "5000",
    "track_functions": "all",
}
TOP_STATEMENTS = 15
TOP_FUNCTIONS = 12
US = 1000.0
# The worker's steps, by the function whose cumulative time is the step's. Each
# runs in a coroutine of its own, so the rows do not contain one another.
STEPS = {
    "fetch (a statement per free slots' worth)": ("worker/app.py", "fetch_job"),
    "a run, from the claimed row to its outcome queued": ("worker/runner.py", "_run_claimed"),
    "outcome writes (the completer's batches)": ("worker/completer.py", "_flush"),
    "results cache writes (written behind)": ("asyncproc/cache.py", "_write_behind"),
    "process pool round trip (within a run)": ("worker/pool.py", "run"),
    "Procrastinate's loop, per job (a run included)": ("procrastinate/worker.py", "_process_job"),
}
# Self time by where the code lives.
LIBRARIES = {
    "procrastinate/": "Procrastinate",
    "psycopg": "psycopg (PostgreSQL client)",
    "redis/": "redis-py",
    "asyncio/": "asyncio event loop",
    "selectors": "asyncio event loop",
    "logging/": "logging",
    "prometheus_client/": "metrics",
    "jsonschema": "payload validation",
    "/worker/": "asyncproc worker",
    "/asyncproc/": "asyncproc worker",
}


@dataclass
class Isolation:
    label: str
    drain: compare.Drain
    wal_bytes: float
    rows: dict[str, float]
    statements: list[dict[str, Any]] | None
    functions: list[dict[str, Any]]


def run(settings: Settings, quick: bool = False, out: TextIO = sys.stdout) -> int:
    tasks = QUICK_TASKS if quick else TASKS
    h = Harness(settings, CONCURRENCY, server_settings=SERVER_SETTINGS)
    try:
        h.start()
        statements = _statements_available(h)
        found = [_measure(h, label, operation, tasks, statements) for label, operation in ISOLATIONS.items()]
        with tempfile.TemporaryDirectory(prefix="asyncproc-profile-") as directory:
            profiled = _profiled_drain(h, tasks, Path(directory))
        _report(out, h, tasks, found, profiled, statements)
    finally:
        h.close()
    return 0


def _statements_available(h: Harness) -> bool:
    """Turn on the statistics of functions, and of statements where the server loads pg_stat_statements."""
    with closing(psycopg.connect(h.database_url, autocommit=True)) as conn:
        name = sql.Identifier(conn.info.dbname)
        conn.execute(sql.SQL("ALTER DATABASE {} SET track_functions = 'all'").format(name))
        if "pg_stat_statements" not in conn.execute("SHOW shared_preload_libraries").fetchone()[0]:
            return False
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        conn.execute(sql.SQL("ALTER DATABASE {} SET pg_stat_statements.track = 'all'").format(name))
    return True


def _preload(h: Harness, operation: str, tasks: int) -> None:
    h.reset()
    with closing(psycopg.connect(h.database_url, autocommit=True)) as conn:
        conn.execute("INSERT INTO tasks (operation, payload) SELECT %s, '{}' FROM generate_series(1, %s)", (operation, tasks))
        conn.execute("ANALYZE tasks, procrastinate_jobs")
        conn.execute("CHECKPOINT")
        conn.execute("SELECT pg_stat_reset()")
        if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'").fetchone():
            conn.execute("SELECT pg_stat_statements_reset()")


def _drain(h: Harness, tasks: int, profile_dir: Path | None = None) -> compare.Drain:
    workers: list = []
    return compare.drain(
        tasks, h.database_url, compare.Asyncproc.LEFT, None,
        lambda: workers.extend(h.start_workers(WORKERS, profile_dir=profile_dir)),
        lambda: h.stop(workers), compare.ROLES,
    )


def _measure(h: Harness, label: str, operation: str, tasks: int, statements: bool) -> Isolation:
    _preload(h, operation, tasks)
    with closing(psycopg.connect(h.database_url, autocommit=True, row_factory=dict_row)) as conn:
        wal_start = conn.execute("SELECT pg_current_wal_lsn() AS lsn").fetchone()["lsn"]
        found = _drain(h, tasks)
        wal = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s) AS bytes", (wal_start,)).fetchone()["bytes"]
        rows = conn.execute(
            "SELECT xact_commit AS commits, tup_inserted AS inserted, tup_updated AS updated, tup_deleted AS deleted"
            " FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
        top = None
        if statements:
            top = conn.execute(
                """
                SELECT toplevel, calls, total_exec_time, regexp_replace(query, '\\s+', ' ', 'g') AS query
                FROM pg_stat_statements
                WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                ORDER BY total_exec_time DESC LIMIT %s
                """,
                (TOP_STATEMENTS,),
            ).fetchall()
        functions = conn.execute(
            "SELECT funcname, calls, self_time, total_time FROM pg_stat_user_functions ORDER BY self_time DESC LIMIT %s",
            (TOP_FUNCTIONS,),
        ).fetchall()
    return Isolation(label, found, float(wal) / tasks, {key: value / tasks for key, value in rows.items()}, top, functions)


def _profiled_drain(h: Harness, tasks: int, directory: Path) -> dict[str, Any]:
    _preload(h, ISOLATIONS["async handler"], tasks)
    found = _drain(h, tasks, profile_dir=directory)
    stats = pstats.Stats(*(str(path) for path in sorted(directory.glob("*.prof"))))
    return {"drain": found, "stats": stats.stats}  # type: ignore[attr-defined]


def _step_seconds(stats: dict, path: str, function: str) -> float:
    return sum(entry[3] for (filename, _, name), entry in stats.items() if name == function and filename.endswith(path))


def _library(filename: str, function: str) -> str:
    if filename == "~":
        return "system calls and C builtins" if "socket" in function or "select" in function or "poll" in function \
            else "interpreter builtins"
    for marker, label in LIBRARIES.items():
        if marker in filename:
            return label
    return "other Python"


def _short(query: str, width: int = 110) -> str:
    query = query.replace("|", "\\|")
    return query if len(query) <= width else query[: width - 1] + "…"


def _report(out: TextIO, h: Harness, tasks: int, found: list[Isolation], profiled: dict[str, Any], statements: bool) -> None:
    with closing(psycopg.connect(h.database_url, autocommit=True)) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
    out.write(f"## Where a task's time goes\n\n{tasks:,} no-op tasks preloaded, drained by {WORKERS} worker processes x"
              f" {CONCURRENCY}; PostgreSQL {version}; `asyncproc bench --profile`.\n\n")
    out.write("| handler isolation | tasks/s | PostgreSQL ms/task | workers ms/task | WAL bytes/task |"
              " rows written/task | commits/task |\n|---|---|---|---|---|---|---|\n")
    for item in found:
        cpu = item.drain.cpu_ms
        written = item.rows["inserted"] + item.rows["updated"] + item.rows["deleted"]
        out.write(f"| {item.label} | {item.drain.rate:,.0f} | {cpu.get('PostgreSQL', 0):.3f} | {cpu.get('workers', 0):.3f} |"
                  f" {item.wal_bytes:,.0f} | {written:.2f} ({item.rows['inserted']:.2f} ins, {item.rows['updated']:.2f} upd,"
                  f" {item.rows['deleted']:.2f} del) | {item.rows['commits']:.2f} |\n")
    chosen = found[0]
    out.write(f"\n### PostgreSQL, by statement ({chosen.label})\n\n")
    if not statements or chosen.statements is None:
        out.write("pg_stat_statements is not loaded on this server (shared_preload_libraries): run without"
                  " DATABASE_URL for the embedded PostgreSQL, which loads it.\n")
    else:
        out.write("Nested statements (in functions and triggers) are counted in their caller's time too.\n\n"
                  "| top level | calls/task | µs/task | statement |\n|---|---|---|---|\n")
        for row in chosen.statements:
            out.write(f"| {'yes' if row['toplevel'] else ''} | {row['calls'] / tasks:.2f} |"
                      f" {row['total_exec_time'] * US / tasks:.1f} | `{_short(row['query'])}` |\n")
    out.write(f"\n### PostgreSQL, by function ({chosen.label})\n\n| function | calls/task | self µs/task | total µs/task |\n"
              "|---|---|---|---|\n")
    for row in chosen.functions:
        out.write(f"| {row['funcname']} | {row['calls'] / tasks:.2f} | {row['self_time'] * US / tasks:.1f} |"
                  f" {row['total_time'] * US / tasks:.1f} |\n")
    stats = profiled["stats"]
    total = sum(entry[2] for entry in stats.values())
    unprofiled = next(item for item in found if item.label == "async handler").drain.cpu_ms.get("workers", 0.0)
    out.write(f"\n### The worker, by step (async handler; cProfile, {total:.1f} s of profiled CPU)\n\n"
              f"µs/task: the step's share of the profiled CPU times the unprofiled drain's {unprofiled:.3f} ms per task.\n\n"
              "| step | share | µs/task |\n|---|---|---|\n")
    for label, (path, function) in STEPS.items():
        share = _step_seconds(stats, path, function) / total if total else 0.0
        out.write(f"| {label} | {share:.0%} | {share * unprofiled * US:.0f} |\n")
    libraries: dict[str, float] = {}
    for (filename, _, function), entry in stats.items():
        key = _library(filename, function)
        libraries[key] = libraries.get(key, 0.0) + entry[2]
    out.write("\n| where the worker's own CPU is spent (self time) | share | µs/task |\n|---|---|---|\n")
    for label, seconds in sorted(libraries.items(), key=lambda item: -item[1]):
        share = seconds / total if total else 0.0
        out.write(f"| {label} | {share:.0%} | {share * unprofiled * US:.0f} |\n")
