"""The invariants of a recorded history, checked once the queue has settled.

The history is what the handlers wrote (ops.py), the accepted task ids and
every HTTP answer (driver.py), the `tasks` rows, and the attempts ledger
`asyncproc_attempts`. Each check returns violations with their evidence;
report() lays them out with the seed that replays the schedule.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import psycopg
from psycopg.rows import dict_row

from tests.faults.history.driver import ActionLog, Answer

FINAL = {"completed", "failed", "cancelled"}
OUTCOMES = {"running", "completed", "failed", "retried", "cancelled", "interrupted", "lost"}
# Outcomes whose attempt certainly ran its handler.
RAN = {"completed", "retried"}
# A 5xx up to this long after the database came back is part of its restart.
RESTART_SLACK_SECONDS = 5.0
# Clock readings of the handlers (time.time()) and of PostgreSQL (now()) come
# from the same host clock; this only absorbs rounding.
CLOCK_SLACK_SECONDS = 0.05
SHOWN_PER_INVARIANT = 12
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

INVARIANTS = {
    1: "no two runs of one task overlap",
    2: "external runs and the attempts ledger match one to one",
    3: "counted attempts never exceed max_attempts",
    4: "every accepted task reaches a final status",
    5: "a completed task's result is its last run's output",
    6: "no deadlocks",
    7: "no 5xx outside a database restart",
    8: "no process died or hung unbidden, no request refused (4xx)",
}


@dataclass
class Run:
    """One run's first and last lines: a 30-minute history has too many ticks to keep."""

    run: str
    task: str
    attempt: int
    op: str
    pid: int
    wpid: int
    first: dict
    last: dict
    count: int = 1

    @property
    def start_t(self) -> float:
        return self.first["t"]

    @property
    def last_t(self) -> float:
        return self.last["t"]

    @property
    def ended(self) -> str | None:
        """The end line's outcome, or None for a run that was killed."""
        return self.last.get("outcome") if self.last["e"] == "end" else None


@dataclass
class Violation:
    invariant: int
    title: str
    evidence: list[str] = field(default_factory=list)


@dataclass
class History:
    seed: int
    seconds: float
    origin: float
    runs: dict[str, Run]
    tasks: dict[str, dict]
    # None when the database has no asyncproc_attempts table.
    ledger: list[dict] | None
    accepted: dict[str, str]
    answers: list[Answer]
    db_down: list[tuple[float, float]]
    actions: ActionLog
    deadlocks: int
    deadlock_readings: list[tuple[float, int]]
    pg_log: Path
    logs_dir: Path
    unplanned_exits: list[tuple[float, str, int]]
    fenced_exits: list[tuple[float, str]]
    hung: list[tuple[float, str]]
    settle_seconds: float | None
    log_index: dict[str, list[str]] | None = None

    def rel(self, t: float | None) -> str:
        return "-" if t is None else f"{t - self.origin:.3f}s"


def read_runs(path: Path) -> dict[str, Run]:
    runs: dict[str, Run] = {}
    if not path.exists():
        return runs
    with open(path) as history:
        for raw in history:
            line = json.loads(raw)
            run = runs.get(line["run"])
            if run is None:
                runs[line["run"]] = Run(line["run"], line["task"], line["attempt"], line["op"], line["pid"],
                                        line["wpid"], line, line)
            else:
                # One thread writes each run's lines in turn, so the file keeps their order.
                run.last = line
                run.count += 1
    return runs


def read_database(url: str) -> tuple[dict[str, dict], list[dict] | None]:
    with psycopg.connect(url, row_factory=dict_row, application_name="history-checker") as conn:
        tasks = {
            row["task_id"]: row
            for row in conn.execute(
                "SELECT task_id::text, operation, status, attempts, max_attempts, result, error_message,"
                " extract(epoch FROM created_at)::float8 AS created_at FROM tasks"
            )
        }
        if conn.execute("SELECT to_regclass('asyncproc_attempts') IS NOT NULL AS present").fetchone()["present"]:
            ledger = conn.execute(
                "SELECT id, task_id::text, attempt, worker_id, host, pid, outcome, error,"
                " extract(epoch FROM started_at)::float8 AS started_at,"
                " extract(epoch FROM finished_at)::float8 AS finished_at"
                " FROM asyncproc_attempts ORDER BY id"
            ).fetchall()
        else:
            ledger = None
    return tasks, ledger


# -- evidence ---------------------------------------------------------------------


def _run_text(h: History, run: Run) -> list[str]:
    end = f"end {run.ended}" if run.ended else f"no end line (last {run.last['e']})"
    return [
        f"run {run.run}: task {run.task} attempt {run.attempt} {run.op} pid {run.pid} worker pid {run.wpid},"
        f" {h.rel(run.start_t)} .. {h.rel(run.last_t)}, {end}, {run.count} line(s)",
        f"    first: {json.dumps(run.first, separators=(',', ':'))}",
        f"    last:  {json.dumps(run.last, separators=(',', ':'))}",
    ]


def _row_text(h: History, row: dict) -> str:
    return (
        f"ledger #{row['id']}: attempt {row['attempt']} {row['outcome']} worker {row['worker_id']} pid {row['pid']}"
        f" {h.rel(row['started_at'])} .. {h.rel(row['finished_at'])} error {row['error']!r:.120}"
    )


def _task_text(h: History, task_id: str) -> list[str]:
    task = h.tasks.get(task_id)
    if task is None:
        return [f"task {task_id}: no row"]
    return [
        f"task {task_id} {task['operation']}: {task['status']}, attempts {task['attempts']} of {task['max_attempts']},"
        f" result {json.dumps(task['result'])}, error {task['error_message']!r:.160}, created {h.rel(task['created_at'])}"
    ]


def _actions_between(h: History, start: float, end: float, task_id: str | None = None) -> list[str]:
    lines = []
    for entry in sorted(h.actions.entries, key=lambda e: e.at):
        if start <= entry.at <= end or (task_id and task_id in entry.result):
            lines.append("action " + entry.line(h.origin))
    return lines


def _log_index(h: History) -> dict[str, list[str]]:
    """The service's log lines by the task ids they name, read once: a long run's logs are large."""
    if h.log_index is None:
        h.log_index = defaultdict(list)
        for path in sorted(h.logs_dir.glob("*.log")):
            if path.name == "actions.log":
                continue  # its lines are shown as actions
            for line in path.read_text(errors="replace").splitlines():
                for task_id in set(UUID.findall(line)):
                    h.log_index[task_id].append(f"{path.name}: {line[:240]}")
        for lines in h.log_index.values():
            # Lines start with their time: in time order across the processes' logs.
            lines.sort(key=lambda line: line.partition(": ")[2])
    return h.log_index


def _log_lines(h: History, task_id: str, limit: int = 15) -> list[str]:
    found = list(_log_index(h).get(task_id, []))
    if len(found) > limit:
        found = found[: limit // 2] + [f"... {len(found) - limit} more ..."] + found[-(limit - limit // 2):]
    return found


def _task_evidence(h: History, task_id: str, ledger_rows: Iterable[dict] = (), runs: Iterable[Run] = ()) -> list[str]:
    lines = _task_text(h, task_id)
    for run in runs:
        lines += _run_text(h, run)
    lines += [_row_text(h, row) for row in ledger_rows]
    return lines + [line for line in _actions_between(h, 0, -1, task_id)]


# -- the invariants -----------------------------------------------------------------


def _runs_by_task(h: History) -> dict[str, list[Run]]:
    by_task: dict[str, list[Run]] = defaultdict(list)
    for run in h.runs.values():
        by_task[run.task].append(run)
    for runs in by_task.values():
        runs.sort(key=lambda run: run.start_t)
    return by_task


def _rows_by_task(h: History) -> dict[str, list[dict]]:
    by_task: dict[str, list[dict]] = defaultdict(list)
    for row in h.ledger or []:
        by_task[row["task_id"]].append(row)
    return by_task


def check_overlaps(h: History) -> list[Violation]:
    found = []
    rows = _rows_by_task(h)
    for task_id, runs in _runs_by_task(h).items():
        for i, a in enumerate(runs):
            for b in runs[i + 1:]:
                # Recorded intervals lie inside the real ones, so any overlap here is real.
                if b.start_t < a.last_t:
                    evidence = _task_evidence(h, task_id, rows.get(task_id, []), [a, b])
                    evidence += _actions_between(h, a.start_t - 5, b.start_t + 1)
                    evidence += _log_lines(h, task_id)
                    found.append(Violation(1, f"task {task_id}: run {b.run} (attempt {b.attempt}) started"
                                              f" {a.last_t - b.start_t:.3f}s before run {a.run} (attempt {a.attempt})"
                                              f" last wrote", evidence))
    return found


def _compatible(run: Run, row: dict) -> bool:
    if row["pid"] is not None and row["pid"] not in (run.pid, run.wpid):
        return False
    if row["started_at"] is not None and row["started_at"] > run.start_t + CLOCK_SLACK_SECONDS:
        return False
    return row["finished_at"] is None or row["finished_at"] + CLOCK_SLACK_SECONDS >= run.start_t


def _match(runs: list[Run], rows: list[dict]) -> dict[str, int]:
    """A maximum matching of runs to compatible rows (Kuhn's augmenting paths): run id -> row index."""
    owner: dict[int, str] = {}
    by_id = {run.run: run for run in runs}

    def augment(run: Run, seen: set[int]) -> bool:
        for index, row in enumerate(rows):
            if index in seen or not _compatible(run, row):
                continue
            seen.add(index)
            if index not in owner or augment(by_id[owner[index]], seen):
                owner[index] = run.run
                return True
        return False

    for run in runs:
        augment(run, set())
    return {run_id: index for index, run_id in owner.items()}


def check_ledger(h: History) -> list[Violation]:
    if h.ledger is None:
        return [Violation(2, "no attempts ledger: the table asyncproc_attempts does not exist, so no run can be"
                             f" matched to an attempt ({len(h.runs)} external runs recorded)")]
    found = []
    runs_by_key: dict[tuple[str, int], list[Run]] = defaultdict(list)
    for run in h.runs.values():
        runs_by_key[(run.task, run.attempt)].append(run)
    rows_by_key: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for row in h.ledger:
        rows_by_key[(row["task_id"], row["attempt"])].append(row)
    rows_by_task = _rows_by_task(h)
    runs_by_task = _runs_by_task(h)

    for row in h.ledger:
        if row["outcome"] not in OUTCOMES:
            found.append(Violation(2, f"ledger row #{row['id']} has the unknown outcome {row['outcome']!r}",
                                   [_row_text(h, row)]))
        elif row["outcome"] == "running" and h.tasks.get(row["task_id"], {}).get("status") in FINAL:
            found.append(Violation(2, f"ledger row #{row['id']} is still running, but its task is"
                                      f" {h.tasks[row['task_id']]['status']}",
                                   _task_evidence(h, row["task_id"], rows_by_task[row["task_id"]],
                                                  runs_by_task.get(row["task_id"], []))))

    for key in sorted(set(runs_by_key) | set(rows_by_key)):
        task_id, attempt = key
        runs, rows = runs_by_key.get(key, []), rows_by_key.get(key, [])
        matched = _match(runs, rows)
        evidence = None

        def context() -> list[str]:
            return (_task_evidence(h, task_id, rows_by_task.get(task_id, []), runs_by_task.get(task_id, []))
                    + _log_lines(h, task_id))

        for run in runs:
            if run.run not in matched:
                near = [row for row in rows if row["pid"] is not None and row["pid"] not in (run.pid, run.wpid)]
                why = f"; {len(near)} row(s) of that attempt name another pid" if near else ""
                evidence = evidence or context()
                found.append(Violation(2, f"task {task_id} attempt {attempt}: run {run.run} has no ledger row of its"
                                          f" own ({len(rows)} row(s) for that attempt, {len(runs)} run(s)){why}",
                                       evidence))
        used = set(matched.values())
        for index, row in enumerate(rows):
            if index not in used and row["outcome"] in RAN:
                evidence = evidence or context()
                found.append(Violation(2, f"task {task_id} attempt {attempt}: ledger row #{row['id']} is"
                                          f" {row['outcome']} but no external run matches it", evidence))
        for run in runs:
            if run.run not in matched:
                continue
            row = rows[matched[run.run]]
            if row["outcome"] == "completed" and run.ended != "ok":
                evidence = evidence or context()
                found.append(Violation(2, f"task {task_id} attempt {attempt}: ledger row #{row['id']} is completed"
                                          f" but its run {run.run} ended {run.ended or 'without an end line'}",
                                       evidence))
            # A cancel may finish the row while a thread that cannot be killed runs on (docs/handlers.md).
            if (row["outcome"] != "cancelled" and row["finished_at"] is not None
                    and run.last_t > row["finished_at"] + CLOCK_SLACK_SECONDS):
                evidence = evidence or context()
                found.append(Violation(2, f"task {task_id} attempt {attempt}: run {run.run} went on"
                                          f" {run.last_t - row['finished_at']:.3f}s after its ledger row #{row['id']}"
                                          f" was finished as {row['outcome']}", evidence))
    return found


def check_attempt_counts(h: History) -> list[Violation]:
    found = []
    counted: Counter[str] = Counter(row["task_id"] for row in h.ledger or [] if row["outcome"] != "interrupted")
    rows = _rows_by_task(h)
    for task_id, task in h.tasks.items():
        if task["attempts"] > task["max_attempts"]:
            found.append(Violation(3, f"task {task_id}: attempts {task['attempts']} > max_attempts {task['max_attempts']}",
                                   _task_evidence(h, task_id, rows.get(task_id, []))))
        if counted[task_id] > task["max_attempts"]:
            found.append(Violation(3, f"task {task_id}: {counted[task_id]} counted ledger attempts >"
                                      f" max_attempts {task['max_attempts']}",
                                   _task_evidence(h, task_id, rows.get(task_id, []))))
    return found


def check_final(h: History) -> list[Violation]:
    found = []
    rows = _rows_by_task(h)
    runs = _runs_by_task(h)
    for task_id, source in sorted(h.accepted.items()):
        task = h.tasks.get(task_id)
        if task is None:
            found.append(Violation(4, f"task {task_id} was accepted ({source}) but has no row"))
        elif task["status"] not in FINAL:
            found.append(Violation(4, f"task {task_id} ({source}) is still {task['status']}",
                                   _task_evidence(h, task_id, rows.get(task_id, []), runs.get(task_id, []))
                                   + _log_lines(h, task_id)))
    for task_id, task in sorted(h.tasks.items()):
        # A request that timed out may still have created its task.
        if task_id not in h.accepted and task["status"] not in FINAL:
            found.append(Violation(4, f"task {task_id} (not seen accepted) is still {task['status']}",
                                   _task_evidence(h, task_id, rows.get(task_id, []), runs.get(task_id, []))))
    return found


def check_results(h: History) -> list[Violation]:
    found = []
    runs_by_task = _runs_by_task(h)
    for task_id, task in sorted(h.tasks.items()):
        if task["status"] != "completed":
            continue
        runs = runs_by_task.get(task_id, [])
        result = task["result"]
        produced = result.get("run") if isinstance(result, dict) else None
        if not runs:
            found.append(Violation(5, f"task {task_id} is completed but no run of it was recorded", _task_text(h, task_id)))
        elif produced != runs[-1].run or runs[-1].ended != "ok":
            which = next((f"run {r.run} (attempt {r.attempt})" for r in runs if r.run == produced), "no recorded run")
            found.append(Violation(5, f"task {task_id}: its result came from {which}, but its last run is"
                                      f" {runs[-1].run} (attempt {runs[-1].attempt}, ended {runs[-1].ended})",
                                   _task_evidence(h, task_id, _rows_by_task(h).get(task_id, []), runs)
                                   + _log_lines(h, task_id)))
    return found


def check_deadlocks(h: History) -> list[Violation]:
    if h.deadlocks == 0:
        return []
    evidence = [f"pg_stat_database.deadlocks readings: {[(h.rel(t), v) for t, v in h.deadlock_readings]}"]
    lines = h.pg_log.read_text(errors="replace").splitlines() if h.pg_log.exists() else []
    for index, line in enumerate(lines):
        if "deadlock detected" not in line:
            continue
        # The report goes on in the same backend's DETAIL, CONTEXT and STATEMENT lines and their continuations.
        backend = line.split("]")[0] + "]"
        evidence.append(line[:400])
        for more in lines[index + 1:index + 40]:
            if not (more.startswith("\t") or more.startswith(backend)):
                break
            evidence.append(more[:400])
    return [Violation(6, f"{h.deadlocks} deadlock(s) during the run", evidence[:120])]


def _near_actions(h: History, t: float, kinds: tuple[str, ...], before: float = 5.0) -> list[str]:
    return [entry.line(h.origin) for entry in sorted(h.actions.entries, key=lambda e: e.at)
            if entry.kind in kinds and t - before <= entry.at <= t + 1]


def check_http(h: History) -> list[Violation]:
    found = []
    for answer in h.answers:
        if answer.status >= 500:
            allowed = any(answer.sent <= up + RESTART_SLACK_SECONDS and answer.answered >= down for down, up in h.db_down)
            if not allowed:
                near = _near_actions(h, answer.sent, ("terminate_backend", "api_sigterm", "api_sigkill", "restart",
                                                      "lock_task", "lock_job", "lock_settings"))
                found.append(Violation(7, f"{answer.status} to {answer.method} {answer.path} sent at {h.rel(answer.sent)},"
                                          f" answered after {answer.answered - answer.sent:.2f}s",
                                       [f"body: {answer.detail}"] + [f"recent action: {line}" for line in near]))
    return found


def check_processes(h: History) -> list[Violation]:
    found = []
    for at, who, code in h.unplanned_exits:
        found.append(Violation(8, f"{who} exited with code {code} at about {h.rel(at)} without being stopped",
                               _near_actions(h, at, tuple(), before=10) or []))
    for at, who in h.hung:
        found.append(Violation(8, f"{who} did not exit within 30s of being stopped (at {h.rel(at)})"))
    for answer in h.answers:
        if 400 <= answer.status < 500:
            found.append(Violation(8, f"{answer.status} to {answer.method} {answer.path} at {h.rel(answer.sent)}",
                                   [f"body: {answer.detail}"]))
    return found


def check(h: History) -> list[Violation]:
    return [
        *check_overlaps(h),
        *check_ledger(h),
        *check_attempt_counts(h),
        *check_final(h),
        *check_results(h),
        *check_deadlocks(h),
        *check_http(h),
        *check_processes(h),
    ]


def summary(h: History) -> list[str]:
    statuses = Counter(task["status"] for task in h.tasks.values())
    answers = Counter(f"{a.method} {a.status // 100}xx" if a.status else f"{a.method} transport error" for a in h.answers)
    kinds = Counter(entry.kind for entry in h.actions.entries)
    skipped = Counter(entry.kind for entry in h.actions.entries if entry.result.startswith("skipped"))
    errors = Counter(entry.kind for entry in h.actions.entries if entry.result.startswith("error"))
    ended = Counter(run.ended or "killed" for run in h.runs.values())
    ledger = "absent" if h.ledger is None else dict(Counter(row["outcome"] for row in h.ledger))
    return [
        f"tasks: {dict(statuses)} ({Counter(h.accepted.values())} accepted)",
        f"runs: {len(h.runs)} by how they ended {dict(ended)}; ledger rows: {ledger}",
        f"answers: {dict(answers)}",
        f"actions: {dict(kinds)}",
        f"  skipped: {dict(skipped)}; refused or failed: {dict(errors)}",
        f"database outages: {[(h.rel(d), h.rel(u)) for d, u in h.db_down]}",
        f"workers that fenced themselves (exit 75, restarted): {[(h.rel(t), who) for t, who in h.fenced_exits]}",
        f"deadlocks: {h.deadlocks}; settled in: {'not settled' if h.settle_seconds is None else f'{h.settle_seconds:.1f}s'}",
    ]


def report(h: History, violations: list[Violation], artifacts: Path) -> str:
    lines = [
        f"history checker: HISTORY_SEED={h.seed} HISTORY_SECONDS={h.seconds:g}",
        f"replay: HISTORY_SEED={h.seed} HISTORY_SECONDS={h.seconds:g} pytest tests/faults/test_history.py",
        f"artifacts (history.jsonl, actions.log, worker/api logs, postgres.log): {artifacts}",
        *summary(h),
    ]
    by_invariant: dict[int, list[Violation]] = defaultdict(list)
    for violation in violations:
        by_invariant[violation.invariant].append(violation)
    for number, title in INVARIANTS.items():
        found = by_invariant.get(number, [])
        lines.append(f"[{'FAIL' if found else 'ok'}] {number}. {title}" + (f": {len(found)} violation(s)" if found else ""))
        for violation in found[:SHOWN_PER_INVARIANT]:
            lines.append(f"  - {violation.title}")
            lines += [f"      {line}" for line in dict.fromkeys(violation.evidence)]
        if len(found) > SHOWN_PER_INVARIANT:
            lines.append(f"  ... and {len(found) - SHOWN_PER_INVARIANT} more")
    return "\n".join(lines)
