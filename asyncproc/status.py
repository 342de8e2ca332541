"""`asyncproc status`: is the service up, how full is the queue, which workers are alive."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from asyncproc import db, locate, uplock
from asyncproc.config import Settings
from asyncproc.db import query
from asyncproc.errors import ConfigError
from asyncproc.humanize import duration

# The exit status of `asyncproc status` when nothing runs, as for `systemctl status`.
NOT_RUNNING = 3


def run(settings: Settings) -> int:
    """`asyncproc status`: print the service, the queue and the workers; the exit status."""
    print("\n".join(service_lines(settings.data_dir)))
    try:
        database_url = locate.database_url(settings)
    except ConfigError as exc:
        print(f"database: not running ({exc})")
        return NOT_RUNNING
    with db.connect(database_url, settings.db, "asyncproc-status") as conn:
        print("\n".join(database_lines(conn, database_url)))
    return 0


def service_lines(data_dir: Path) -> list[str]:
    holder = uplock.running(data_dir)
    if holder is None:
        return [f"service:  no `asyncproc up` runs with {data_dir}"]
    lines = [f"service:  `asyncproc up` pid {holder.get('pid', '?')}, API {holder.get('api') or 'starting'}"]
    if holder.get("api"):
        lines.append(f"health:   {_health(holder['api'])}")
    return lines


def _health(api: str) -> str:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=3) as response:
            return response.read().decode().strip()
    except urllib.error.HTTPError as exc:
        return f"{exc.code} {exc.read().decode(errors='replace').strip()}"
    except (urllib.error.URLError, OSError) as exc:
        return f"no answer ({getattr(exc, 'reason', exc)})"


def without_password(database_url: str) -> str:
    params = conninfo_to_dict(database_url)
    if "password" in params:
        params["password"] = "***"
    return make_conninfo(**params)


def database_lines(conn: psycopg.Connection, database_url: str) -> list[str]:
    lines = [f"database: {without_password(database_url)}"]
    counts = conn.execute(query("status_task_counts")).fetchall()
    lines.append("tasks:    " + (", ".join(f"{row['status']} {row['tasks']}" for row in counts) or "none"))
    queue = conn.execute(query("status_queue")).fetchone()
    oldest = queue["oldest_pending_age"]
    lines.append(
        f"queue:    {queue['pending']} pending, {queue['ready']} ready to run"
        + (f", oldest waiting {duration(oldest)}" if oldest is not None else "")
    )
    workers = conn.execute(query("status_workers")).fetchall()
    lines.append(f"workers:  {len(workers)}")
    for row in workers:
        lines.append(
            f"  worker {row['id']}: {row['running']} running, last heartbeat {duration(row['silent_for'])} ago"
        )
    return lines
