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
import re
import ssl
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import SplitResult, quote, urlsplit

import psycopg_pool

from asyncproc.config import CallbackSettings
from asyncproc.db import query
from asyncproc.ledger import task_from_claim
from asyncproc.service import encode_document
from asyncproc.webhooks import NOT_PUBLIC, SIGNATURE_HEADER, CallbackRefused, IPAddress, NotPublic, check_resolved, sign

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 16
# A claimed delivery is leased for its call's deadline (the whole call,
# _attempt) and this long more, to record the attempt: no other worker takes it
# while it is under way.
LEASE_MARGIN_SECONDS = 30.0
MAX_BACKOFF_SECONDS = 3600.0
MAX_ERROR_CHARS = 1000
# The answer's status line and headers; its body is never read.
MAX_ANSWER_HEAD_BYTES = 8192
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])[ \r]")
# What RFC 3986 allows as is in a path and a query; anything else is percent-encoded, as urllib3 does.
_TARGET_SAFE = "/?:@!$&'()*+,;=%"
_TLS = ssl.create_default_context()


class MalformedAnswer(Exception):
    """The receiver's answer is not an HTTP/1.x status line and headers of at most MAX_ANSWER_HEAD_BYTES."""


@dataclass(frozen=True)
class Outcome:
    state: str
    response_status: int | None
    error: str | None
    duration_ms: int
    retry_in: float = 0.0


async def deliver_callbacks(settings: CallbackSettings, pool: psycopg_pool.AsyncConnectionPool) -> None:
    """One step of the delivery loop (supervised in worker/main.py): deliver until none is due or under way.

    Up to MAX_IN_FLIGHT deliveries run at once, each recorded as soon as it
    ends, and a slot that frees up is filled again: a slow receiver holds its
    own slot, never the other deliveries.
    """
    under_way: set[asyncio.Task[None]] = set()
    try:
        while True:
            if len(under_way) < MAX_IN_FLIGHT:
                rows = await _claim(settings, pool, MAX_IN_FLIGHT - len(under_way))
                under_way.update(asyncio.create_task(_deliver(settings, pool, row)) for row in rows)
            if not under_way:
                return
            done, under_way = await asyncio.wait(
                under_way, timeout=settings.poll_seconds, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                task.result()
    finally:
        for task in under_way:
            task.cancel()
        await asyncio.gather(*under_way, return_exceptions=True)


async def _claim(settings: CallbackSettings, pool: psycopg_pool.AsyncConnectionPool, limit: int) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        cursor = await conn.execute(
            query("callbacks_claim_due"),
            {"lease_seconds": settings.timeout_seconds + LEASE_MARGIN_SECONDS, "limit": limit},
        )
        return await cursor.fetchall()


async def _deliver(settings: CallbackSettings, pool: psycopg_pool.AsyncConnectionPool, row: dict[str, Any]) -> None:
    outcome = await _attempt(settings, row)
    async with pool.connection() as conn:
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


async def _attempt(settings: CallbackSettings, row: dict[str, Any]) -> Outcome:
    started = time.monotonic()
    secret = row["key_secret"] or settings.secret
    if secret is None:
        return Outcome("failed", None, "no secret to sign with: the task has no API key and ASYNCPROC_CALLBACK_SECRET is unset", 0)
    body = encode_document(task_from_claim(row["task"]))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "asyncproc-webhooks",
        "X-Asyncproc-Delivery": str(row["id"]),
        SIGNATURE_HEADER: sign(secret, body),
    }
    status = None
    try:
        # One deadline for the whole call, from resolving the host to the last
        # byte read: a receiver that answers a byte at a time cannot stretch it.
        async with asyncio.timeout(settings.timeout_seconds):
            address = await asyncio.to_thread(check_resolved, row["url"], settings.allow)
            status = await post_pinned(row["url"], address, body, headers)
        if 200 <= status < 300:
            return Outcome("delivered", status, None, _ms(started))
        error = f"HTTP {status}"
    except NotPublic as exc:
        # The stored error is the tenant's to read; what their host name resolves to is not.
        log.warning("callback %s refused: %s", row["id"], exc)
        return Outcome("failed", None, f"refused: {NOT_PUBLIC}", _ms(started))
    except CallbackRefused as exc:
        return Outcome("failed", None, f"refused: {exc}", _ms(started))
    except TimeoutError:
        error = f"timed out: no complete answer within {settings.timeout_seconds:g} s"
    except (OSError, UnicodeError, MalformedAnswer) as exc:
        error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
    return _retry_or_give_up(settings, row, status, error, _ms(started))


async def post_pinned(url: str, address: IPAddress, body: bytes, headers: dict[str, str]) -> int:
    """POST to `url` at the checked `address`; the answer's status. The caller bounds its time.

    The connection goes to that address, never to a fresh lookup of the host.
    HTTPS still verifies the certificate against the host name (and sends it
    as SNI). Redirects are not followed: the allow-list checked this URL, not
    where it points. Proxies are not used: they would bypass the address check.
    Only the answer's status line and headers are read, at most
    MAX_ANSWER_HEAD_BYTES: its body, of any size and maybe compressed, is
    dropped with the connection, never decoded.
    """
    parts = urlsplit(url)
    https = parts.scheme == "https"
    reader, writer = await asyncio.open_connection(
        str(address),
        parts.port or (443 if https else 80),
        ssl=_TLS if https else None,
        server_hostname=parts.hostname if https else None,
        limit=MAX_ANSWER_HEAD_BYTES,
    )
    try:
        writer.write(_request_head(parts, headers, len(body)) + body)
        await writer.drain()
        return await _read_status(reader)
    finally:
        # Nothing more is wanted from the receiver, not even a TLS goodbye.
        writer.transport.abort()


def _request_head(parts: SplitResult, headers: dict[str, str], length: int) -> bytes:
    target = quote((parts.path or "/") + (f"?{parts.query}" if parts.query else ""), safe=_TARGET_SAFE)
    host = parts.netloc.rpartition("@")[2].encode("idna").decode("ascii")
    # identity: an honest receiver has no reason to compress what is never read.
    fields = {
        **headers,
        "Host": host,
        "Content-Length": str(length),
        "Accept-Encoding": "identity",
        "Connection": "close",
    }
    lines = [f"POST {target} HTTP/1.1", *(f"{name}: {value}" for name, value in fields.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


async def _read_status(reader: asyncio.StreamReader) -> int:
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise MalformedAnswer(f"the answer's status line and headers exceed {MAX_ANSWER_HEAD_BYTES} bytes") from None
        except asyncio.IncompleteReadError:
            raise MalformedAnswer("the connection closed before the answer's headers ended") from None
        match = _STATUS_LINE.match(head)
        if match is None:
            raise MalformedAnswer(f"not an HTTP/1.x answer: {head[:60]!r}")
        status = int(match[1])
        # A 1xx answer (100 Continue, 103 Early Hints) is interim: the final one follows.
        if status >= 200:
            return status


def _retry_or_give_up(settings: CallbackSettings, row: dict[str, Any], status: int | None, error: str, duration_ms: int) -> Outcome:
    delay = min(settings.backoff_seconds * 2 ** (row["attempts"] - 1), MAX_BACKOFF_SECONDS)
    delay *= random.uniform(0.8, 1.2)
    give_up_at = row["created_at"] + timedelta(seconds=settings.max_age_seconds)
    if datetime.now(timezone.utc) + timedelta(seconds=delay) > give_up_at:
        return Outcome("failed", status, f"{error}; gave up after {row['attempts']} attempt(s)", duration_ms)
    return Outcome("pending", status, error, duration_ms, delay)


def _ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
