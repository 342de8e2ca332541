"""A task never runs twice at once, and a run its worker cut short never costs an attempt.

Every run is seen from outside the service: the handlers of
tests/faults/fencing_ops.py append a start line, a tick every 50 ms and an end
line to a file, so a test knows when each run began and ended (a run killed by
force has no end line) and whether two runs of a task overlapped.

Timing. The defaults are heartbeat 10 s, stalled 30 s, grace 30 s; these tests
keep stalled = 3 x heartbeat, at heartbeat 1 s (the outage test: 3 s, see
there). A worker's heartbeat is at most one heartbeat old when it stops
beating, and another worker's sweep, every sweep period, looks for it once it
is `stalled` old: another worker can take a silent worker's task from
(stalled - heartbeat) after it fell silent, and does by (stalled + sweep
period). With grace = stalled that moment may fall inside or after the grace
period, so a test of it could pass by luck; the SIGTERM tests use a grace past
it (LONG_GRACE_SECONDS), and with a handler that outlives that moment but ends
inside the grace, the defect shows every time.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import wait_for
from tests.faults.fencing_ops import LOG_VARIABLE, TICK_SECONDS, Run, process_alive, read_runs

pytestmark = pytest.mark.faults

OPERATIONS_MODULE = "tests.faults.fencing_ops"
HEARTBEAT_SECONDS = 1
STALLED_SECONDS = 3 * HEARTBEAT_SECONDS
SWEEP_PERIOD_SECONDS = 1  # worker.main.sweep_period at these settings
# Another worker takes a silent worker's task by stalled + sweep period: past that, with room to spare.
LONG_GRACE_SECONDS = 8
assert LONG_GRACE_SECONDS >= STALLED_SECONDS + SWEEP_PERIOD_SECONDS + 4
# Longer than it takes another worker to take the task of a silent one, shorter than LONG_GRACE.
INSIDE_GRACE_RUN_SECONDS = 6
# A worker process takes a few seconds to import and connect on a busy machine.
START_SLACK_SECONDS = 30
FINAL = ("completed", "failed", "cancelled")


@pytest.fixture
def runs_log(tmp_path: Path) -> Path:
    return tmp_path / "runs.jsonl"


def _env(runs_log: Path, grace: float, **extra: str) -> dict[str, str]:
    return {
        "ASYNCPROC_OPERATIONS_MODULE": OPERATIONS_MODULE,
        LOG_VARIABLE: str(runs_log),
        "ASYNCPROC_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS),
        "ASYNCPROC_STALLED_SECONDS": str(STALLED_SECONDS),
        "ASYNCPROC_SHUTDOWN_GRACE_SECONDS": str(grace),
        **extra,
    }


def _insert(conn: psycopg.Connection, operation: str, payload: dict, max_attempts: int = 3, priority: int = 0) -> str:
    """A task queued as psql would queue it."""
    row = conn.execute(
        "INSERT INTO tasks (operation, payload, max_attempts, priority) VALUES (%s, %s, %s, %s)"
        " RETURNING task_id::text",
        (operation, Jsonb(payload), max_attempts, priority),
    ).fetchone()
    return row[0] if isinstance(row, tuple) else row["task_id"]


def _submit(cluster, operation: str, payload: dict, max_attempts: int = 3) -> str:
    with psycopg.connect(cluster.url, autocommit=True) as conn:
        return _insert(conn, operation, payload, max_attempts)


def _task(cluster, task_id: str) -> dict:
    return cluster.query(
        "SELECT status, attempts, error_message FROM tasks WHERE task_id = %s", (task_id,)
    )[0]


def _finished(cluster, task_id: str, timeout: float) -> dict:
    def probe():
        row = _task(cluster, task_id)
        return row if row["status"] in FINAL else None

    return wait_for(probe, timeout, f"task {task_id} to finish", interval=0.1)


def _runs_of(runs_log: Path, task_id: str) -> list[Run]:
    return [run for run in read_runs(runs_log) if run.task_id == task_id]


def _started(runs_log: Path, task_id: str, timeout: float = START_SLACK_SECONDS) -> Run:
    def first() -> Run | None:
        return next(iter(_runs_of(runs_log, task_id)), None)

    return wait_for(first, timeout, f"task {task_id}'s handler to start")


def _all_runs_over(runs_log: Path, task_ids: list[str], timeout: float = 10) -> list[Run]:
    """Every run of these tasks, once each has ended or its process is gone."""

    def probe():
        runs = [run for run in read_runs(runs_log) if run.task_id in task_ids]
        return runs if all(run.ended or not process_alive(run.pid) for run in runs) else None

    return wait_for(probe, timeout, "every run to be over", interval=0.05)


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return 0
    return int(stat.rpartition(")")[2].split()[1])


def _owner(pid: int, workers: list[subprocess.Popen]) -> subprocess.Popen:
    """The worker whose process tree holds `pid` (a handler runs in a child of the worker's fork server)."""
    by_pid = {worker.pid: worker for worker in workers}
    ancestor = pid
    while ancestor > 1:
        if ancestor in by_pid:
            return by_pid[ancestor]
        ancestor = _parent(ancestor)
    raise AssertionError(f"pid {pid} is in no worker's process tree")


def _assert_no_overlap(runs: list[Run], origin: float) -> None:
    """No run of a task started while another was running, on any worker; times are seconds after `origin`."""
    story = "\n".join(f"  task {run.task_id[-12:]}: {run.describe(origin)}" for run in runs)
    for index, run in enumerate(runs):
        if run.running_elsewhere:
            pytest.fail(f"a run started while an earlier run of its task still ran:\n{story}")
        for other in runs[index + 1:]:
            if other.task_id == run.task_id and run.overlaps(other):
                pytest.fail(f"two runs of task {run.task_id} overlap:\n{story}")


def _both_workers_take_tasks(cluster, runs_log: Path) -> None:
    """Two gate tasks that each wait for the other: both single-slot workers are up and fetching."""
    gates = [_submit(cluster, "fence_gate", {"group": "ready", "count": 2}) for _ in range(2)]
    for gate in gates:
        assert _finished(cluster, gate, START_SLACK_SECONDS)["status"] == "completed"


@pytest.mark.parametrize("max_attempts", [3, 1])
def test_sigterm_keeps_the_task_of_a_handler_that_ends_inside_grace_from_any_other_worker(
    fleet, cluster, runs_log, max_attempts
):
    env = _env(runs_log, LONG_GRACE_SECONDS)
    workers = [fleet.worker("worker-1", concurrency=1, **env), fleet.worker("worker-2", concurrency=1, **env)]
    _both_workers_take_tasks(cluster, runs_log)
    task_id = _submit(
        cluster, "fence_run", {"seconds": INSIDE_GRACE_RUN_SECONDS, "rerun_seconds": 0.5}, max_attempts
    )
    stopping = _owner(_started(runs_log, task_id).pid, workers)

    stopped_at = time.time()
    stopping.send_signal(signal.SIGTERM)
    # It exits once its handler has ended, inside the grace period.
    assert stopping.wait(LONG_GRACE_SECONDS + 10) == 0
    row = _finished(cluster, task_id, 20)
    runs = _all_runs_over(runs_log, [task_id])

    _assert_no_overlap(runs, stopped_at)
    assert [(run.attempt, run.ended) for run in runs] == [(1, True)], [run.describe(stopped_at) for run in runs]
    assert runs[0].last < stopped_at + LONG_GRACE_SECONDS
    assert (row["status"], row["attempts"]) == ("completed", 1), row["error_message"]


def _last_renewal(cluster):
    """The newest heartbeat any worker wrote: a worker's lease renewal writes it."""
    return cluster.query("SELECT max(last_heartbeat) AS at FROM procrastinate_workers")[0]["at"]


def test_a_short_database_outage_does_not_abort_a_running_handler(fleet, cluster, runs_log, tmp_path):
    """PostgreSQL stops for 3 s under a running handler: the handler runs on, once, to its end.

    At heartbeat 1 s (stalled 3 s) a worker may not outlive a 3 s outage with
    its lease; at heartbeat 3 s, with the outage starting just after a
    renewal, its lease has 6 s left. Today the worker stops Procrastinate
    when its listener loses the database (about 2 s in), and aborts the
    handler a grace period later, long after the database is back.
    """
    heartbeat, outage = 3, 3
    grace = stalled = 3 * heartbeat
    env = _env(runs_log, grace, ASYNCPROC_HEARTBEAT_SECONDS=str(heartbeat), ASYNCPROC_STALLED_SECONDS=str(stalled))
    worker = fleet.worker("worker-1", concurrency=2, **env)
    release = tmp_path / "release"
    task_id = _submit(cluster, "fence_run", {"seconds": 60, "until_file": str(release), "rerun_seconds": 0.5})
    _started(runs_log, task_id)

    renewed = _last_renewal(cluster)
    wait_for(lambda: _last_renewal(cluster) != renewed, heartbeat + 5, "a lease renewal", interval=0.02)
    cluster.stop()
    down_at = time.time()

    def handler_ran_until(moment: float):
        def probe():
            # The handler still ticks at `moment`, or its run is over.
            runs = _runs_of(runs_log, task_id)
            return any(run.last >= moment or run.ended or not process_alive(run.pid) for run in runs)

        return probe

    wait_for(handler_ran_until(down_at + outage), outage + 10, f"the handler to run through {outage}s of outage")
    cluster.start()
    # Past the moment when today's worker aborts it: the outage, then the grace period.
    wait_for(handler_ran_until(down_at + outage + grace + 1.5), grace + 15, "the handler to run on after the outage")
    release.touch()

    row = _finished(cluster, task_id, 30)
    runs = _all_runs_over(runs_log, [task_id])
    _assert_no_overlap(runs, down_at)
    assert [(run.attempt, run.ended) for run in runs] == [(1, True)], (
        "the handler must run on through the outage, once and to its end: "
        + "; ".join(run.describe(down_at) for run in runs)
    )
    assert (row["status"], row["attempts"]) == ("completed", 1), row["error_message"]

    assert worker.poll() is None, "the worker must ride out the outage"
    after = _submit(cluster, "fence_run", {"seconds": 0})
    assert _finished(cluster, after, 20)["status"] == "completed"
    assert _owner(_runs_of(runs_log, after)[0].pid, [worker]) is worker
    assert worker.poll() is None


def test_a_handler_past_grace_is_killed_before_its_task_is_released_with_its_attempt_back(fleet, cluster, runs_log):
    env = _env(runs_log, LONG_GRACE_SECONDS)
    workers = [fleet.worker("worker-1", concurrency=1, **env), fleet.worker("worker-2", concurrency=1, **env)]
    _both_workers_take_tasks(cluster, runs_log)
    # Its first run ignores should_stop and would run for minutes; the next run is short.
    task_id = _submit(cluster, "fence_run", {"seconds": 300, "rerun_seconds": 0.5})
    stopping = _owner(_started(runs_log, task_id).pid, workers)

    stopped_at = time.time()
    stopping.send_signal(signal.SIGTERM)
    assert stopping.wait(LONG_GRACE_SECONDS + 10) == 0
    row = _finished(cluster, task_id, 20)
    runs = _all_runs_over(runs_log, [task_id])

    _assert_no_overlap(runs, stopped_at)
    assert len(runs) == 2, [run.describe(stopped_at) for run in runs]
    killed, again = runs
    assert not killed.ended and not process_alive(killed.pid), "the first run is killed"
    # Killed at the end of the grace period, not before: it ticked until then.
    assert killed.last >= stopped_at + LONG_GRACE_SECONDS - 4 * TICK_SECONDS, killed.describe(stopped_at)
    assert again.ended
    assert again.attempt == 1, f"the released attempt was counted: {again.describe(stopped_at)}"
    assert (row["status"], row["attempts"]) == ("completed", 1), row["error_message"]


def _fetch_waits_for_lock(cluster) -> bool:
    return bool(cluster.query(
        "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%fetch_job%'"
    ))


def test_jobs_fetched_but_not_started_cost_no_attempt_when_the_database_is_down_as_the_worker_stops(
    fleet, cluster, runs_log
):
    """A fetch for three free slots claims three tasks; SIGTERM arrives while that fetch is in flight.

    On b6f7df8 the worker started the first job (its handler runs 2 s) and
    kept the other two unstarted until the grace period ended; PostgreSQL stops
    while the first handler runs, so the worker could not give the two back
    then, gave up and exited, and the next worker's sweep counted them as runs
    lost with their worker. A worker that gives back at once what a fetch
    brings after its stop starts none of them. Either way, the two must not
    cost an attempt. The next worker starts only once the first has exited, so
    that no sweep races the first worker's giving back.
    """
    grace = 4
    # The fetch waits on the test's table lock; it must not give up meanwhile.
    env = _env(runs_log, grace, ASYNCPROC_WORKER_LOCK_TIMEOUT_MS="60000")
    worker = fleet.worker("worker-1", concurrency=3, **env)
    ready = _submit(cluster, "fence_run", {"seconds": 0})
    assert _finished(cluster, ready, START_SLACK_SECONDS)["status"] == "completed"

    with psycopg.connect(cluster.url) as holder:
        # Every fetch waits for this lock; the tasks (and their jobs) appear when it is released.
        holder.execute("LOCK TABLE procrastinate_jobs IN EXCLUSIVE MODE")
        started = _insert(holder, "fence_run", {"seconds": 2}, priority=1)
        unstarted = [_insert(holder, "fence_run", {"seconds": 0.1}) for _ in range(2)]
        wait_for(lambda: _fetch_waits_for_lock(cluster), 10, "the worker's fetch to wait for the lock", interval=0.02)
        worker.send_signal(signal.SIGTERM)
        log = fleet.logs / "worker-1.log"
        # Its log says it took the signal (today "received SIGTERM: finishing running tasks ...").
        wait_for(lambda: "SIGTERM" in log.read_text(errors="replace"), 10, "the worker to take the SIGTERM")
    # Released: the fetch in flight claims all three; the worker either starts
    # the first and keeps the others, or gives all three back at once.
    def started_or_given_back() -> bool:
        if _runs_of(runs_log, started):
            return True
        rows = cluster.tasks([started, *unstarted])
        return all((row["status"], row["attempts"]) == ("pending", 0) for row in rows.values())

    wait_for(started_or_given_back, 10, "the first task's handler to start, or all three to be given back")

    cluster.stop()
    down_at = time.time()
    # Down until the worker has stopped, or for long enough that it has tried to.
    # (Today it gives up and exits about 2 x the 2 s pool timeout after the grace period.)
    limit = time.monotonic() + grace + 8
    wait_for(lambda: worker.poll() is not None or time.monotonic() > limit, grace + 20, "the worker to stop")
    cluster.start()
    # Only once it is gone does another worker come, to run what it left.
    worker.wait(30)
    fleet.worker("worker-2", concurrency=3, **env)

    rows = {task_id: _finished(cluster, task_id, START_SLACK_SECONDS + 20) for task_id in [started, *unstarted]}
    runs = _all_runs_over(runs_log, [started, *unstarted])
    _assert_no_overlap(runs, down_at)
    for task_id in unstarted:
        ran = [(run.attempt, run.ended) for run in runs if run.task_id == task_id]
        assert ran == [(1, True)], f"task {task_id} never started before the stop, yet ran as {ran}: {rows[task_id]}"
        assert (rows[task_id]["status"], rows[task_id]["attempts"]) == ("completed", 1), rows[task_id]
