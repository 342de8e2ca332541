"""Durations as a person reads them ("8.7 s", "3 min 12 s"), not as Python prints a timedelta."""

from __future__ import annotations

from datetime import timedelta


def duration(value: timedelta | float) -> str:
    """`value` (a timedelta, or seconds) in its two largest units, to the precision a reader needs."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds < 0:
        return "-" + duration(-seconds)
    if seconds == 0:
        return "0 s"
    if round(seconds * 1000, 1) < 10:
        return f"{seconds * 1000:.1f} ms"
    if round(seconds * 1000) < 1000:
        return f"{seconds * 1000:.0f} ms"
    if round(seconds, 1) < 10:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} day{'s' if days > 1 else ''}" + (f" {hours} h" if hours else "")
    if hours:
        return f"{hours} h" + (f" {minutes} min" if minutes else "")
    if minutes:
        return f"{minutes} min" + (f" {secs} s" if secs else "")
    return f"{secs} s"
