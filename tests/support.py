"""What several test modules share and pytest does not inject: constants and helpers.

Test modules import from here (or take conftest fixtures), never from each other.
"""

from __future__ import annotations

import configparser
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from asyncproc import db, keys
# The bench ships the one copy; the tests use it as wait_for (tests.conftest.wait_for too).
from asyncproc.bench.polling import wait_until as wait_for

# The checkout the tests run from: its documents, deployment files and packaging.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def setup_cfg() -> configparser.ConfigParser:
    parsed = configparser.ConfigParser(interpolation=None)
    parsed.read_string((PROJECT_ROOT / "setup.cfg").read_text())
    return parsed


def _lines(value: str) -> list[str]:
    return [line.strip() for line in value.splitlines() if line.strip() and not line.strip().startswith("#")]


def package_sources() -> dict[str, Path]:
    """Each package setup.cfg installs, and the checkout's directory it is built from (package_dir applied)."""
    options = setup_cfg()["options"]
    mapped = dict(
        (name.strip(), PROJECT_ROOT / directory.strip())
        for name, directory in (line.split("=", 1) for line in _lines(options.get("package_dir", "")))
    )
    sources = {}
    for package in _lines(options["packages"]):
        parts = package.split(".")
        for cut in range(len(parts), 0, -1):
            if ".".join(parts[:cut]) in mapped:
                sources[package] = mapped[".".join(parts[:cut])].joinpath(*parts[cut:])
                break
        else:
            sources[package] = PROJECT_ROOT.joinpath(*parts)
    return sources


# ---------------------------------------------------------------- the database, as the integration tests drive it


def connect(url: str, **kwargs: Any) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=True, row_factory=dict_row, **kwargs)


def insert_task(conn, operation="compute", payload='{"n": 10}') -> str:
    return conn.execute(
        "INSERT INTO tasks (operation, payload) VALUES (%s, %s) RETURNING task_id", (operation, payload)
    ).fetchone()["task_id"]


def jobs_for(conn, task_id) -> list[dict]:
    return conn.execute(
        "SELECT status::text AS status, queueing_lock, args, scheduled_at FROM procrastinate_jobs"
        " WHERE args->>'task_id' = %s::text ORDER BY id",
        (task_id,),
    ).fetchall()


def fail_task(worker_conn, task_id, attempts=1, error="boom"):
    worker_conn.execute("UPDATE tasks SET status = 'running', attempts = %s WHERE task_id = %s", (attempts, task_id))
    worker_conn.execute(
        "UPDATE tasks SET status = 'failed', error_message = %s WHERE task_id = %s", (error, task_id)
    )


def task_row(conn, task_id) -> dict:
    return conn.execute(
        "SELECT status, attempts, max_attempts, error_message, priority, scheduled_at FROM tasks WHERE task_id = %s",
        (task_id,),
    ).fetchone()


def register_worker(conn) -> int:
    return conn.execute("SELECT worker_id FROM procrastinate_register_worker_v1()").fetchone()["worker_id"]


def fetch(conn, worker_id: int) -> dict | None:
    """The worker's fetch, as the worker runs it: one transaction that takes a job and claims its task."""
    params = {"queues": ["asyncproc"], "worker_id": worker_id, "how_many": 1}
    return conn.execute(db.query("jobs_fetch"), params).fetchone()


def new_owner(conn) -> int:
    """A new API key's id, to own tasks."""
    name = f"tenant-{uuid.uuid4().hex[:12]}"
    keys.create(conn, name)
    return conn.execute("SELECT id FROM api_keys WHERE name = %s", (name,)).fetchone()["id"]


def queue(conn, owner: int | None, count: int = 1, priority: int = 0) -> list[str]:
    """`count` compute tasks of `owner`, inserted in one statement; their ids."""
    rows = conn.execute(
        "INSERT INTO tasks (operation, payload, owner, priority)"
        " SELECT 'compute', jsonb_build_object('n', i), %s, %s FROM generate_series(1, %s) AS i"
        " RETURNING task_id::text",
        (owner, priority, count),
    ).fetchall()
    return [row["task_id"] for row in rows]


# ---------------------------------------------------------------- API keys over HTTP


def new_key(conn) -> str:
    return keys.create(conn, f"e2e-{uuid.uuid4().hex[:12]}")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
