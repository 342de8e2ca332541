"""The completion-webhook delivery loop, run by every worker.

A task reaching a final status queues a row in asyncproc_callbacks in the same
transaction (migrations/current/70_schedules_webhooks.sql). Each worker takes due rows with SKIP LOCKED,
POSTs the task's document, signed, and records the attempt. A failed call is
retried with exponential backoff until ASYNCPROC_CALLBACK_MAX_AGE_SECONDS
after the task finished; a URL the allow-list refuses is not retried.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlsplit

import psycopg_pool
import urllib3

from asyncproc.config import CallbackSettings
from asyncproc.db import query
from asyncproc.ledger import task_from_claim
from asyncproc.service import encode_document
from asyncproc.webhooks import SIGNATURE_HEADER, CallbackRefused, IPAddress, check_resolved, sign

log = logging.getLogger(__name__)

BATCH = 16
MAX_BACKOFF_SECONDS = 3600.0
MAX_ERROR_CHARS = 1000


@dataclass(frozen=True)
class Outcome:
    state: str
    response_status: int | None
    error: str | None
    duration_ms: int
    retry_in: float = 0.0


async def deliver_callbacks(settings: CallbackSettings, pool: psycopg_pool.AsyncConnectionPool) -> None:
    """One step of the delivery loop (supervised in worker/main.py): deliver until none is due."""
    while await deliver_due(settings, pool) == BATCH:
        pass


async def deliver_due(settings: CallbackSettings, pool: psycopg_pool.AsyncConnectionPool) -> int:
    """Deliver up to BATCH due callbacks at once; how many were taken."""
    lease = settings.timeout_seconds + 30
    async with pool.connection() as conn:
        cursor = await conn.execute(query("callbacks_claim_due"), {"lease_seconds": lease, "limit": BATCH})
        rows = await cursor.fetchall()
    outcomes = await asyncio.gather(*(asyncio.to_thread(_deliver, settings, row) for row in rows))
    async with pool.connection() as conn:
        for row, outcome in zip(rows, outcomes):
            await conn.execute(
                query("callback_record_attempt"),
                {
                    "id": row["id"],
                    "state": outcome.state,
                    "response_status": outcome.response_status,
                    "error": outcome.error,
                    "duration_ms": outcome.duration_ms,
                    "retry_in": outcome.retry_in,
                },
            )
            log.log(
                logging.INFO if outcome.state == "delivered" else logging.WARNING,
                "callback %s for task %s, attempt %s: %s%s",
                row["id"],
                row["task_id"],
                row["attempts"],
                outcome.state,
                f" ({outcome.error})" if outcome.error else "",
            )
    return len(rows)


def _deliver(settings: CallbackSettings, row: dict[str, Any]) -> Outcome:
    started = time.monotonic()
    secret = row["key_secret"] or settings.secret
    if secret is None:
        return Outcome("failed", None, "no secret to sign with: the task has no API key and ASYNCPROC_CALLBACK_SECRET is unset", 0)
    try:
        address = check_resolved(row["url"], settings.allow)
    except CallbackRefused as exc:
        return Outcome("failed", None, f"refused: {exc}", _ms(started))
    body = encode_document(task_from_claim(row["task"]))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "asyncproc-webhooks",
        "X-Asyncproc-Delivery": str(row["id"]),
        SIGNATURE_HEADER: sign(secret, body),
    }
    status = None
    try:
        status = post_pinned(row["url"], address, body, headers, settings.timeout_seconds)
        if 200 <= status < 300:
            return Outcome("delivered", status, None, _ms(started))
        error = f"HTTP {status}"
    except urllib3.exceptions.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
    return _retry_or_give_up(settings, row, status, error, _ms(started))


def post_pinned(url: str, address: IPAddress, body: bytes, headers: dict[str, str], timeout: float) -> int:
    """POST to `url` at the checked `address`; the response status.

    The connection goes to that address, never to a fresh lookup of the host.
    HTTPS still verifies the certificate against the host name (and sends it
    as SNI). Redirects are not followed: the allow-list checked this URL, not
    where it points. Proxies from the environment are not used: they would
    bypass the address check.
    """
    parts = urlsplit(url)
    host = parts.hostname
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    common = {"port": port, "timeout": urllib3.Timeout(total=timeout), "retries": False, "maxsize": 1}
    if https:
        pool = urllib3.HTTPSConnectionPool(str(address), server_hostname=host, assert_hostname=host, **common)
    else:
        pool = urllib3.HTTPConnectionPool(str(address), **common)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = parts.netloc.rpartition("@")[2]
    try:
        response = pool.urlopen(
            "POST", target, body=body, headers={**headers, "Host": host_header}, redirect=False
        )
        return response.status
    finally:
        pool.close()


def _retry_or_give_up(settings: CallbackSettings, row: dict[str, Any], status: int | None, error: str, duration_ms: int) -> Outcome:
    delay = min(settings.backoff_seconds * 2 ** (row["attempts"] - 1), MAX_BACKOFF_SECONDS)
    delay *= random.uniform(0.8, 1.2)
    give_up_at = row["created_at"] + timedelta(seconds=settings.max_age_seconds)
    if datetime.now(timezone.utc) + timedelta(seconds=delay) > give_up_at:
        return Outcome("failed", status, f"{error}; gave up after {row['attempts']} attempt(s)", duration_ms)
    return Outcome("pending", status, error, duration_ms, delay)


def _ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
