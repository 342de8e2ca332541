"""The SQL CHECK constraints, the last line of defence for rows that never pass
the API, and the column defaults agree with asyncproc.contract."""

from __future__ import annotations

import re

import pytest

from asyncproc import contract

# (table, column): the request field whose rule its constraint repeats.
CONSTRAINED = {
    ("tasks", "max_attempts"): "max_attempts",
    ("tasks", "timeout_seconds"): "timeout_seconds",
    ("asyncproc_schedules", "max_attempts"): "max_attempts",
}
DEFAULTED = {
    ("tasks", "max_attempts"): "max_attempts",
    ("tasks", "priority"): "priority",
    ("asyncproc_schedules", "max_attempts"): "max_attempts",
    ("asyncproc_schedules", "priority"): "priority",
}
OPERATORS = {">=": "minimum", ">": "exclusiveMinimum", "<=": "maximum", "<": "exclusiveMaximum"}
BOUND = re.compile(r"\((\w+) (>=|>|<=|<) \(?(-?[\d.]+)\)?(?:::[\w ]+)?\)")


def _bounds(conn, table: str, column: str) -> dict[str, float]:
    definitions = conn.execute(
        "SELECT pg_get_constraintdef(c.oid) AS definition FROM pg_constraint AS c"
        " JOIN pg_attribute AS a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)"
        " WHERE c.contype = 'c' AND c.conrelid = %s::regclass AND a.attname = %s",
        (table, column),
    ).fetchall()
    return {
        OPERATORS[operator]: float(number)
        for row in definitions
        for name, operator, number in BOUND.findall(row["definition"])
        if name == column
    }


@pytest.mark.parametrize("table,column", list(CONSTRAINED), ids=[".".join(key) for key in CONSTRAINED])
def test_the_check_constraint_has_the_contracts_bounds(conn, table, column):
    schema = contract.PROCESS_FIELDS[CONSTRAINED[table, column]]
    expected = {keyword: float(schema[keyword]) for keyword in OPERATORS.values() if keyword in schema}
    assert _bounds(conn, table, column) == expected and expected


@pytest.mark.parametrize("table,column", list(DEFAULTED), ids=[".".join(key) for key in DEFAULTED])
def test_the_column_default_is_the_contracts(conn, table, column):
    row = conn.execute(
        "SELECT column_default FROM information_schema.columns WHERE table_name = %s AND column_name = %s",
        (table, column),
    ).fetchone()
    assert row["column_default"] == str(contract.PROCESS_FIELDS[DEFAULTED[table, column]]["default"])
