"""The dashboard's queries: each runs as the literal text its "Show SQL" prints.

The parameters are bound on the client (psycopg's ClientCursor), so the text
sent to PostgreSQL is exactly the text a reader can paste into psql, and the
planner sees every filter as a constant: a filter left empty folds away rather
than hiding an index behind a generic plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row

from asyncproc.db import query


@dataclass(frozen=True)
class Ran:
    """A query's rows and the SQL that produced them."""

    rows: list[dict[str, Any]]
    sql: str


def bound_sql(conn: psycopg.Connection, name: str, params: dict[str, Any] | None = None) -> str:
    with psycopg.ClientCursor(conn) as cursor:
        return cursor.mogrify(query(name), params or {})


def run(conn: psycopg.Connection, name: str, params: dict[str, Any] | None = None) -> Ran:
    text = bound_sql(conn, name, params)
    with conn.cursor(row_factory=dict_row) as cursor:
        cursor.execute(text.encode(), prepare=False)
        return Ran(cursor.fetchall(), text)
