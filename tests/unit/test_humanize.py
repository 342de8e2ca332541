"""Durations as a person reads them, not as Python prints a timedelta."""

from __future__ import annotations

from datetime import timedelta

import pytest

from asyncproc.humanize import duration


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (timedelta(seconds=8, microseconds=701023), "8.7 s"),
        (timedelta(minutes=3, seconds=12, microseconds=400000), "3 min 12 s"),
        (timedelta(milliseconds=42.4), "42 ms"),
        (timedelta(microseconds=380), "0.4 ms"),
        (0, "0 s"),
        (59.96, "1 min"),
        (45.2, "45 s"),
        (timedelta(hours=2, minutes=5, seconds=30), "2 h 5 min"),
        (timedelta(days=7), "7 days"),
        (timedelta(days=1, hours=3), "1 day 3 h"),
        (timedelta(seconds=-3), "-3.0 s"),
    ],
)
def test_a_duration_reads_in_its_two_largest_units(value, text):
    assert duration(value) == text
