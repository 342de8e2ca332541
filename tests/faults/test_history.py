"""A randomized history under faults, checked in the spirit of Jepsen/Elle.

One API and three workers run tasks whose handlers record every run outside
the service (tests/faults/history/ops.py), while a seeded schedule kills and
restarts workers, handler children, the API and PostgreSQL, cuts
connections, holds row locks, and cancels, retries, reprioritises,
reschedules, limits and pauses with SQL (history/driver.py). Once the faults
stop and the queue settles, history/checker.py checks the invariants against
the recorded runs, the tasks table and the attempts ledger.

    HISTORY_SECONDS=1800 pytest tests/faults/test_history.py    # a 30-minute soak
    HISTORY_SEED=1234 pytest tests/faults/test_history.py       # replay a schedule
"""

from __future__ import annotations

import os
import random
import shutil
import time

import pytest

from tests.faults.history import checker
from tests.faults.history.driver import ActionLog, DeadlockCounter, Driver, FleetControl

pytestmark = pytest.mark.faults

# An attempt runs up to 9 s, a task up to 4 attempts with backoff, a few were
# moved up to 8 s on, and a worker stopped last may take its grace (10 s) to
# give its tasks back: far less than this once every process is back.
SETTLE_SECONDS = float(os.environ.get("HISTORY_SETTLE_SECONDS", "120"))


def _unsettled(cluster, accepted: dict[str, str]) -> list[str]:
    rows = {row["task_id"]: row["status"] for row in cluster.query("SELECT task_id::text, status FROM tasks")}
    return sorted({*(t for t in accepted if t not in rows), *(t for t, s in rows.items() if s not in checker.FINAL)})


def _settle(cluster, control: FleetControl, accepted: dict[str, str]) -> float | None:
    """Seconds until every task is final, or None at the deadline (the checker reports which are not)."""
    started = time.monotonic()
    while _unsettled(cluster, accepted):
        control.revive_fenced()
        if time.monotonic() - started > SETTLE_SECONDS:
            return None
        time.sleep(0.5)
    return time.monotonic() - started


def test_history_under_faults(fleet, cluster, tmp_path):
    began = time.monotonic()
    seed = int(os.environ.get("HISTORY_SEED") or random.SystemRandom().randrange(2**32))
    seconds = float(os.environ.get("HISTORY_SECONDS", "90"))
    print(f"HISTORY_SEED={seed} HISTORY_SECONDS={seconds:g} (artifacts in {tmp_path})", flush=True)

    history = tmp_path / "history.jsonl"
    fleet.overrides.update(ASYNCPROC_OPERATIONS_MODULE="tests.faults.history.ops", HISTORY_LOG=str(history))
    origin = time.time()
    log = ActionLog(tmp_path / "actions.log", origin)
    control = FleetControl(fleet, cluster, log)
    deadlocks = DeadlockCounter(cluster.url)
    driver = Driver(seed, seconds, fleet, cluster, control, log, deadlocks, history)
    control.start_api()
    for slot, grace in driver.schedule.graces.items():
        control.start_worker(slot, grace)
    driver.run()

    control.ensure_up()
    driver.clear_limits()
    settled = _settle(cluster, control, driver.accepted)
    # Stopped before reading: no handler writes to the history any more, and
    # every backend has flushed its statistics (the deadlock count).
    control.stop_all()
    deadlocks.checkpoint()
    tasks, ledger = checker.read_database(cluster.url)
    log.close()
    # The cluster fixture removes its directory at teardown; its log is evidence.
    shutil.copy(cluster.server.logfile, tmp_path / "postgres.log")

    recorded = checker.History(
        seed=seed, seconds=seconds, origin=origin, runs=checker.read_runs(history), tasks=tasks, ledger=ledger,
        accepted=dict(driver.accepted), answers=list(driver.answers), db_down=list(driver.db_down), actions=log,
        deadlocks=deadlocks.total, deadlock_readings=deadlocks.readings, pg_log=tmp_path / "postgres.log",
        logs_dir=fleet.logs, unplanned_exits=control.unplanned_exits, fenced_exits=control.fenced_exits,
        hung=control.hung, settle_seconds=settled,
    )
    violations = checker.check(recorded)
    report = checker.report(recorded, violations, tmp_path)
    report += f"\ntotal time {time.monotonic() - began:.0f}s"
    (tmp_path / "history-report.txt").write_text(report + "\n")
    print(report)
    assert not violations, report
