"""Per-key quotas (`asyncproc keys limit`): what one API key may buy.

Priority, batch size and timeout_seconds are checked on the request; the
number of pending plus running tasks in the transaction that inserts, under a
lock on the key's row, so that concurrent requests cannot overshoot it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from asyncproc import ledger
from asyncproc.db import query
from asyncproc.errors import QuotaExceeded


@dataclass(frozen=True)
class Quota:
    max_active_tasks: int | None = None
    max_priority: int | None = None
    max_batch_tasks: int | None = None
    max_timeout_seconds: float | None = None


NO_QUOTA = Quota()


def check_request(quota: Quota, items: list[dict[str, Any]]) -> None:
    """`items`: the validated task requests (one for POST /process)."""
    if quota.max_batch_tasks is not None and len(items) > quota.max_batch_tasks:
        _refuse(f"This key may send at most {quota.max_batch_tasks} tasks per batch, not {len(items)}")
    for item in items:
        priority = item.get("priority", 0)
        if quota.max_priority is not None and _number(priority) and priority > quota.max_priority:
            _refuse(f"This key may use priority {quota.max_priority} at most, not {priority}")
        # timeout_seconds (the handler's time limit) where the request may set one.
        timeout = item.get("timeout_seconds")
        if quota.max_timeout_seconds is not None and _number(timeout) and timeout > quota.max_timeout_seconds:
            _refuse(f"This key may ask for timeout_seconds {quota.max_timeout_seconds:g} at most, not {timeout:g}")


def check_active(conn: psycopg.Connection, quota: Quota, owner: int | None, adding: int) -> None:
    """Before inserting `adding` tasks for `owner`, in the same transaction."""
    if quota.max_active_tasks is None or owner is None:
        return
    conn.execute(query("api_key_lock"), {"id": owner})
    active = ledger.tasks_count_active_of_owner(conn, owner)
    if active + adding > quota.max_active_tasks:
        _refuse(
            f"This key may have {quota.max_active_tasks} tasks pending or running at most; "
            f"it has {active} and asked for {adding} more"
        )


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _refuse(message: str) -> None:
    raise QuotaExceeded(message)
