"""Per-client token buckets kept in PostgreSQL, shared by every API process.

A bucket holds up to `burst` tokens and refills at `rate` per second; each
request takes one. The whole decision is one UPSERT on an UNLOGGED table.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import psycopg

from asyncproc.db import query


@dataclass(frozen=True)
class Decision:
    allowed: bool
    # Whole seconds until a token is available; 0 when allowed.
    retry_after: int


def take(conn: psycopg.Connection, bucket: str, rate: float, burst: int) -> Decision:
    row = conn.execute(query("rate_bucket_take"), {"bucket": bucket, "rate": rate, "burst": burst}).fetchone()
    if row["granted"]:
        return Decision(True, 0)
    return Decision(False, max(1, math.ceil((1 - row["tokens"]) / rate)))


def prune(conn: psycopg.Connection, limits: list[tuple[float, int]]) -> int:
    """Delete the buckets that have refilled since their last use, whichever of
    the (rate, burst) `limits` they belong to; how many went."""
    idle = max(burst / rate for rate, burst in limits)
    return conn.execute(query("rate_bucket_prune"), {"idle_seconds": idle}).rowcount


class PruneClock:
    """Says when a process's turn to prune has come: once per `every` seconds."""

    def __init__(self, every: float):
        self._every = every
        self._next = time.monotonic() + every
        self._lock = threading.Lock()

    def due(self) -> bool:
        with self._lock:
            now = time.monotonic()
            if now < self._next:
                return False
            self._next = now + self._every
            return True
