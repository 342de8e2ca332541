"""The task list's filters, read from and written back to query parameters, so
that every view of the list can be bookmarked."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Mapping
from uuid import UUID

from asyncproc.keys import NAME_PATTERN

STATUSES = ("pending", "running", "completed", "failed", "cancelled")
_OPERATION = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
_DONE = re.compile(r"(retry|cancel):([0-9]{1,18})")
MAX_ERROR_TEXT = 200
PAGE_SIZE = 50


class BadFilter(ValueError):
    """A filter value the list cannot use; the message names the parameter."""


def _utc(text: str) -> datetime:
    """`text` as an instant in UTC; ValueError when it is none, or outside the years 1-9999 in UTC.

    In UTC, because PostgreSQL refuses some offsets Python takes (+23:59).
    """
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:
        raise ValueError(text) from None


def _time(name: str, text: str) -> datetime:
    try:
        return _utc(text)
    except ValueError:
        raise BadFilter(f"{name} must be a date and time such as 2026-01-31T12:00 (UTC)") from None


@dataclass(frozen=True)
class TaskFilter:
    status: str | None = None
    operation: str | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None
    error: str | None = None
    owner: str | None = None

    @classmethod
    def from_args(cls, args: Mapping[str, str]) -> "TaskFilter":
        def text(name: str) -> str | None:
            value = (args.get(name) or "").strip()
            return value or None

        status, operation, error, owner = text("status"), text("operation"), text("error"), text("owner")
        if status is not None and status not in STATUSES:
            raise BadFilter(f"status must be one of {', '.join(STATUSES)}")
        if operation is not None and not _OPERATION.match(operation):
            raise BadFilter("operation must be 1-100 letters, digits, '_', '.', ':' or '-'")
        if error is not None and len(error) > MAX_ERROR_TEXT:
            raise BadFilter(f"error must be at most {MAX_ERROR_TEXT} characters")
        if error is not None and "\x00" in error:
            raise BadFilter("error must not contain a NUL character")
        if owner is not None and not NAME_PATTERN.match(owner):
            raise BadFilter("owner must be an API key name")
        created_from = _time("from", text("from")) if text("from") else None
        created_to = _time("to", text("to")) if text("to") else None
        return cls(status, operation, created_from, created_to, error, owner)

    def params(self) -> dict[str, Any]:
        """The filter as the named queries' parameters."""
        return asdict(self)

    def args(self) -> dict[str, str]:
        """The filter as query parameters, for links and hidden form fields."""
        values = {
            "status": self.status,
            "operation": self.operation,
            "from": self.created_from.strftime("%Y-%m-%dT%H:%M") if self.created_from else None,
            "to": self.created_to.strftime("%Y-%m-%dT%H:%M") if self.created_to else None,
            "error": self.error,
            "owner": self.owner,
        }
        return {name: value for name, value in values.items() if value is not None}


def keyset(text: str | None) -> tuple[datetime | None, UUID | None]:
    """The `after` parameter, `<created_at>_<task_id>` of the last row shown."""
    if not text:
        return None, None
    stamp, _, task_id = text.rpartition("_")
    try:
        created_at = datetime.fromisoformat(stamp)
        if created_at.utcoffset() != timedelta(0):
            # keyset_of writes UTC; any other offset was written by hand, and PostgreSQL refuses some.
            raise ValueError(stamp)
        return created_at, UUID(task_id)
    except ValueError:
        raise BadFilter("after must be the keyset of a row, as the Next link writes it") from None


def keyset_of(row: Mapping[str, Any]) -> str:
    return f"{row['created_at'].astimezone(timezone.utc).isoformat()}_{row['task_id']}"


def done_notice(text: str | None) -> tuple[str, int] | None:
    """The `done` parameter a bulk action redirects with, `<action>:<count>`.

    Only that shape is shown, so that a link cannot make the page say anything else.
    """
    if text is None:
        return None
    found = _DONE.fullmatch(text)
    if found is None:
        raise BadFilter("done must be retry:N or cancel:N, as a bulk action writes it")
    return found.group(1), int(found.group(2))
