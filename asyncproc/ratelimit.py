"""Per-client token buckets kept in PostgreSQL, shared by every API process.

A bucket holds up to `burst` tokens and refills at `rate` per second; each
request takes one. The whole decision is one UPSERT on an UNLOGGED table.
"""

from __future__ import annotations

import math
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
