"""The task list's filters, read from and written back to query parameters, so
that every view of the list can be bookmarked."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Mapping
from uuid import UUID

from asyncproc.keys import NAME_PATTERN

STATUSES = ("pending", "running", "completed", "failed", "cancelled")
_OPERATION = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
MAX_ERROR_TEXT = 200
PAGE_SIZE = 50


class BadFilter(ValueError):
    """A filter value the list cannot use; the message names the parameter."""


def _time(name: str, text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise BadFilter(f"{name} must be a date and time such as 2026-01-31T12:00 (UTC)") from None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


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
        return datetime.fromisoformat(stamp), UUID(task_id)
    except ValueError:
        raise BadFilter("after must be the keyset of a row, as the Next link writes it") from None


def keyset_of(row: Mapping[str, Any]) -> str:
    return f"{row['created_at'].isoformat()}_{row['task_id']}"
