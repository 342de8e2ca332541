"""Reading any jsonb PostgreSQL holds, and writing it back out unchanged.

jsonb accepts what Python's json module refuses to decode: integers of more
than 4,300 digits, nesting deeper than the interpreter's recursion limit, and
numbers too large for a float. A psql INSERT can put such a value in a task's
payload or result. Every read of a task decodes both, so such a value must not
fail the read: it is kept as RawJson, its text as PostgreSQL sent it, and
written back out verbatim in the task's JSON document.
"""

from __future__ import annotations

import json
import math
from typing import Any

from psycopg.types.json import set_json_loads


class RawJson:
    """A JSON value kept as its text because decoding it failed."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RawJson) and other.text == self.text

    def __repr__(self) -> str:
        return f"RawJson({self.text[:40]!r}{'...' if len(self.text) > 40 else ''})"


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]}... does not fit in a float")
    return value


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    text = data if isinstance(data, str) else bytes(data).decode()
    try:
        return json.loads(text, parse_float=_finite_float)
    except (ValueError, RecursionError):
        return RawJson(text)


def dumps(document: Any) -> str:
    """Compact JSON, with every RawJson spliced in as its own text."""
    raw: list[str] = []

    def placeholder(value: Any) -> str:
        if not isinstance(value, RawJson):
            raise TypeError(f"{type(value).__name__} is not JSON serializable")
        raw.append(value.text)
        # jsonb strings cannot hold NUL, so this marker matches nothing else.
        return f"\x00raw{len(raw) - 1}"

    text = json.dumps(document, separators=(",", ":"), default=placeholder)
    for index, value in enumerate(raw):
        text = text.replace(json.dumps(f"\x00raw{index}"), value, 1)
    return text


def install() -> None:
    """Decode jsonb with loads() on every connection of this process."""
    set_json_loads(loads)
