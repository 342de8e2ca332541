"""Per-operation limits in asyncproc_operation_settings, and `asyncproc limits set|pause|resume|list`.

The limits are applied where a worker claims a task (migrations/current/40_limits.sql): a task
held back stays pending, with the reason in its wait_reason.
"""

from __future__ import annotations

from typing import Any

import psycopg

from asyncproc.db import query
from asyncproc.operations import InvalidInput, registry

# `--max-running none` and the like remove a limit.
UNSET = "none"


class LimitsError(Exception):
    """A refused limits command; the message says why."""


def set_limits(conn: psycopg.Connection, operation: str, **given: Any) -> None:
    """Set the limits named in `given` (max_running, rate_per_second, burst); UNSET removes one."""
    params = {"operation": operation}
    for name, flag in (("max_running", "set_max_running"), ("rate_per_second", "set_rate"), ("burst", "set_burst")):
        value = given.get(name)
        params[flag] = value is not None
        params[name] = None if value in (None, UNSET) else value
    if not any(params[flag] for flag in ("set_max_running", "set_rate", "set_burst")):
        raise LimitsError("give at least one of --max-running, --rate, --burst")
    # Asked of the database, which holds the bounds once for its CHECK, its claim and this command.
    problem = conn.execute(query("operation_limits_problem"), params).fetchone()["problem"]
    if problem is not None:
        raise LimitsError(f"refused: {problem}")
    try:
        conn.execute(query("operation_limits_set"), params)
    except psycopg.errors.CheckViolation as exc:
        raise LimitsError(f"refused: {exc.diag.message_primary}") from None


def pause(conn: psycopg.Connection, operation: str, paused: bool) -> None:
    conn.execute(query("operation_limits_pause"), {"operation": operation, "paused": paused})


def run(conn: psycopg.Connection, args: Any) -> int:
    """`asyncproc limits ...`: print the outcome; the exit code."""
    action = args.limits_command
    if action == "set":
        if not args.force:
            try:
                registry.require(args.operation)
            except InvalidInput as exc:
                raise LimitsError(
                    f"{exc} (a worker with another ASYNCPROC_OPERATIONS_MODULE may know it: --force sets its limits anyway)"
                ) from None
        set_limits(conn, args.operation, max_running=args.max_running, rate_per_second=args.rate, burst=args.burst)
        print(f"limits of {args.operation!r} set")
    elif action in ("pause", "resume"):
        pause(conn, args.operation, action == "pause")
        print(f"{args.operation!r} {action}d")
    else:
        rows = conn.execute(query("operation_limits_list")).fetchall()
        if not rows:
            print("no per-operation limits: `asyncproc limits set` sets some")
        for row in rows:
            limits = [
                f"max_running {row['max_running']}" if row["max_running"] is not None else "max_running -",
                f"rate {row['rate_per_second']:g}/s burst {row['burst'] or '-'}" if row["rate_per_second"] else "rate -",
                "paused" if row["paused"] else "active",
            ]
            print(f"{row['operation']}\t" + "\t".join(limits) + f"\trunning {row['running']}\theld {row['held']}")
    return 0
