"""Schedules: periodic tasks in asyncproc_schedules, and `asyncproc schedules add|list|remove`.

A schedule names its timing either as a cron expression (five fields, UTC, or
an alias such as @hourly) or as every N seconds, counted from the epoch so
that every worker computes the same occurrences. The workers enqueue the
occurrences (worker/scheduler.py); this module says when they fall.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
from croniter import CroniterBadDateError, CroniterError, croniter
from psycopg.types.json import Jsonb

from asyncproc.contract import DEFAULT_MAX_ATTEMPTS, DEFAULT_PRIORITY
from asyncproc.db import query
from asyncproc.humanize import duration
from asyncproc.operations import InvalidInput, registry

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
CATCH_UP = ("skip", "one")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class ScheduleError(Exception):
    """A refused schedule command, or a timing that cannot be computed; the message says why."""


@dataclass(frozen=True)
class Timing:
    cron: str | None = None
    every_seconds: int | None = None

    def check(self) -> None:
        if (self.cron is None) == (self.every_seconds is None):
            raise ScheduleError("give a cron expression or every_seconds, not both")
        if self.cron is not None:
            fields = self.cron.split()
            if not (len(fields) == 5 or (len(fields) == 1 and self.cron.startswith("@"))) or not croniter.is_valid(
                self.cron
            ):
                raise ScheduleError(f"{self.cron!r} is not a five-field cron expression (UTC) or an alias such as @hourly")
            self.after(datetime.now(timezone.utc))
        elif not 1 <= self.every_seconds <= 366 * 86400:
            raise ScheduleError("every_seconds must be from 1 to 31622400")

    def latest(self, now: datetime) -> datetime:
        """The latest occurrence at or before `now`."""
        if self.every_seconds is not None:
            periods = int((now - _EPOCH).total_seconds() // self.every_seconds)
            return _EPOCH + timedelta(seconds=periods * self.every_seconds)
        previous = self._step(now, forward=False)
        # get_prev is strictly before its start; `now` itself may be an occurrence.
        following = self._step(previous, forward=True)
        return following if following <= now else previous

    def after(self, moment: datetime) -> datetime:
        """The first occurrence strictly after `moment`."""
        if self.every_seconds is not None:
            return self.latest(moment) + timedelta(seconds=self.every_seconds)
        return self._step(moment, forward=True)

    def _step(self, start: datetime, forward: bool) -> datetime:
        try:
            cron = croniter(self.cron, start)
        except (CroniterError, ValueError) as exc:
            raise ScheduleError(f"cron {self.cron!r}: {exc}") from None
        try:
            return cron.get_next(datetime) if forward else cron.get_prev(datetime)
        except CroniterBadDateError:
            # A day that no month has (0 0 30 2 *): croniter gives up after its search.
            raise ScheduleError(f"{self.cron!r} never fires") from None


def due_occurrence(
    timing: Timing, next_run_at: datetime, now: datetime, catch_up: str, misfire_seconds: float
) -> datetime | None:
    """The one occurrence to enqueue now, or None.

    However many occurrences passed since `next_run_at`, at most the latest
    one runs: no burst of catch-up runs after downtime. With catch_up 'skip'
    it runs only if it is less than `misfire_seconds` late.
    """
    if next_run_at > now:
        return None
    due = max(timing.latest(now), next_run_at)
    if catch_up == "skip" and (now - due).total_seconds() > misfire_seconds:
        return None
    return due


@dataclass(frozen=True)
class Schedule:
    name: str
    cron: str | None
    every_seconds: int | None
    operation: str
    payload: dict[str, Any]
    priority: int
    max_attempts: int
    enabled: bool
    catch_up: str
    next_run_at: datetime | None
    last_run_at: datetime | None
    last_error: str | None

    @property
    def timing(self) -> Timing:
        return Timing(self.cron, self.every_seconds)


def add(
    conn: psycopg.Connection,
    name: str,
    timing: Timing,
    operation: str,
    payload: dict[str, Any],
    priority: int = DEFAULT_PRIORITY,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    catch_up: str = "skip",
) -> None:
    if not NAME_PATTERN.match(name):
        raise ScheduleError("a schedule name is 1-100 letters, digits, '_', '.', ':' or '-'")
    timing.check()
    try:
        registry.check(operation, payload)
    except InvalidInput as exc:
        raise ScheduleError(str(exc)) from None
    params = {
        "name": name,
        "cron": timing.cron,
        "every_seconds": timing.every_seconds,
        "operation": operation,
        "payload": Jsonb(payload),
        "priority": priority,
        "max_attempts": max_attempts,
        "catch_up": catch_up,
    }
    try:
        conn.execute(query("schedule_insert"), params)
    except psycopg.errors.UniqueViolation:
        raise ScheduleError(f"a schedule named {name!r} exists; remove it first") from None


def remove(conn: psycopg.Connection, name: str) -> bool:
    return conn.execute(query("schedule_delete"), {"name": name}).fetchone() is not None


def list_schedules(conn: psycopg.Connection) -> list[Schedule]:
    return [Schedule(**row) for row in conn.execute(query("schedule_list"))]


def run(conn: psycopg.Connection, args: Any) -> int:
    """`asyncproc schedules add|list|remove`: print the outcome; the exit code."""
    if args.schedules_command == "add":
        try:
            payload = json.loads(args.data)
        except ValueError as exc:
            raise ScheduleError(f"--data is not JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise ScheduleError("--data must be a JSON object")
        timing = Timing(cron=args.cron, every_seconds=args.every)
        add(conn, args.name, timing, args.operation, payload, args.priority, args.max_attempts, args.catch_up)
        print(f"schedule {args.name!r} added")
        return 0
    if args.schedules_command == "remove":
        if not remove(conn, args.name):
            raise ScheduleError(f"no schedule named {args.name!r}")
        print(f"schedule {args.name!r} removed")
        return 0
    found = list_schedules(conn)
    if not found:
        print("no schedules: `asyncproc schedules add` makes one")
    for schedule in found:
        when = f"cron {schedule.cron}" if schedule.cron else f"every {duration(schedule.every_seconds)}"
        state = "enabled" if schedule.enabled else "disabled"
        next_run = schedule.next_run_at.isoformat() if schedule.next_run_at else "-"
        line = f"{schedule.name}\t{when}\t{schedule.operation}\t{state}\tnext {next_run}"
        if schedule.last_error:
            line += f"\terror: {schedule.last_error}"
        print(line)
    return 0

