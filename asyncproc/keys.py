"""API keys: create, verify, revoke, list.

A key reads `apk_<id>_<secret>`. Only sha256(secret) is stored: the secret is
256 random bits, so a slow password hash would add nothing. Verification looks
the row up by id and compares the hashes in constant time; the key is never
logged.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sys
from dataclasses import dataclass
from datetime import datetime

import psycopg

from asyncproc.db import query
from asyncproc.quotas import NO_QUOTA, Quota

PREFIX = "apk"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.@-]{1,100}$")
_KEY_PATTERN = re.compile(rf"^{PREFIX}_(\d{{1,18}})_([A-Za-z0-9_-]{{43}})$")
# Compared against when the id is unknown, so that both paths do the same work.
_NO_HASH = bytes(32)


class KeyCommandError(Exception):
    """A refused key command; the message says why."""


@dataclass(frozen=True)
class ApiKey:
    id: int
    name: str
    created_at: datetime
    revoked_at: datetime | None
    quota: Quota = NO_QUOTA
    # 'read' or 'operate': may sign in to the dashboard; None: may not.
    dashboard_role: str | None = None


@dataclass(frozen=True)
class Caller:
    """A verified key: its id (the owner of its tasks) and its quota."""

    id: int
    quota: Quota


QUOTA_FIELDS = ("max_active_tasks", "max_priority", "max_batch_tasks", "max_timeout_seconds")


def _quota(row: dict) -> Quota:
    return Quota(**{name: row.pop(name) for name in QUOTA_FIELDS})


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def create(conn: psycopg.Connection, name: str, dashboard_role: str | None = None) -> str:
    """Store a new key under `name` and return it; this is the only time it is seen.

    `dashboard_role` ('read' or 'operate') lets the key sign in to the dashboard.
    """
    if not NAME_PATTERN.match(name):
        raise KeyCommandError("a key name is 1-100 letters, digits, '_', '.', '@' or '-'")
    secret = secrets.token_urlsafe(32)
    try:
        with conn.transaction():
            row = conn.execute(query("api_key_insert"), {"name": name, "key_hash": _hash(secret)}).fetchone()
            if dashboard_role is not None:
                conn.execute(query("api_key_set_dashboard_role"), {"name": name, "dashboard_role": dashboard_role})
    except psycopg.errors.UniqueViolation:
        raise KeyCommandError(f"a live key named {name!r} exists; revoke it first") from None
    return f"{PREFIX}_{row['id']}_{secret}"


def verify(conn: psycopg.Connection, key: str) -> Caller | None:
    """The live key `key` with its quota, or None."""
    match = _KEY_PATTERN.match(key)
    if match is None:
        return None
    row = conn.execute(query("api_key_get_live"), {"id": int(match.group(1))}).fetchone()
    stored = _NO_HASH if row is None else bytes(row["key_hash"])
    if hmac.compare_digest(stored, _hash(match.group(2))) and row is not None:
        return Caller(row["id"], _quota(row))
    return None


def set_quota(conn: psycopg.Connection, name: str, quota: Quota) -> None:
    """Replace the quota of the live key `name`; a None field is no limit."""
    row = conn.execute(query("api_key_set_quota"), {"name": name, **vars(quota)}).fetchone()
    if row is None:
        raise KeyCommandError(f"no live key named {name!r}")


def revoke(conn: psycopg.Connection, name: str) -> bool:
    """Revoke the live key named `name`; False when there is none."""
    return conn.execute(query("api_key_revoke"), {"name": name}).fetchone() is not None


def callback_secret(conn: psycopg.Connection, name: str) -> str:
    """The secret that signs the completion webhooks of the live key `name`'s tasks."""
    return conn.execute(query("api_key_callback_secret"), {"name": name}).fetchone()["callback_secret"]


def list_keys(conn: psycopg.Connection) -> list[ApiKey]:
    return [ApiKey(quota=_quota(row), **row) for row in conn.execute(query("api_key_list"))]


def run(
    conn: psycopg.Connection, action: str, name: str | None, quota: Quota = NO_QUOTA, dashboard_role: str | None = None
) -> int:
    """`asyncproc keys create|revoke|limit|list`: print the outcome; the exit code."""
    if action == "create":
        print(create(conn, name, dashboard_role))
        print(f"key {name!r} created; it is shown only this once", file=sys.stderr)
        print(f"its webhook signing secret: {callback_secret(conn, name)}", file=sys.stderr)
        return 0
    if action == "revoke":
        if not revoke(conn, name):
            raise KeyCommandError(f"no live key named {name!r}")
        print(f"key {name!r} revoked")
        return 0
    if action == "limit":
        set_quota(conn, name, quota)
        print(f"key {name!r}: {_describe(quota)}")
        return 0
    found = list_keys(conn)
    if not found:
        print("no API keys: `asyncproc keys create NAME` makes one")
    for key in found:
        state = f"revoked {key.revoked_at.isoformat()}" if key.revoked_at else "live"
        dashboard = f"dashboard {key.dashboard_role}" if key.dashboard_role else "no dashboard"
        print(f"{key.name}\tcreated {key.created_at.isoformat()}\t{state}\t{dashboard}\t{_describe(key.quota)}")
    return 0


def _describe(quota: Quota) -> str:
    limits = [f"{name}={value:g}" for name, value in vars(quota).items() if value is not None]
    return ", ".join(limits) if limits else "no quota"
