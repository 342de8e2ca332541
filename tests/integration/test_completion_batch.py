"""Batched completion (migrations/0014, 0016): many outcomes in one statement, each behind its own attempt's
fence, and their jobs finished in the same statement."""

from __future__ import annotations

from psycopg.types.json import Jsonb

from asyncproc import db
from tests.support import connect, fetch, insert_task, register_worker, task_row


def complete_many(conn, outcomes: list[tuple[str, int, object]], job_ids: list[int] = ()) -> set[str]:
    return complete_with_jobs(conn, outcomes, job_ids)[0]


def complete_with_jobs(conn, outcomes, job_ids) -> tuple[set[str], set[int]]:
    """The tasks recorded, and the jobs finished."""
    rows = conn.execute(db.query("tasks_mark_completed"), {
        "task_ids": [task_id for task_id, _, _ in outcomes],
        "attempts": [attempt for _, attempt, _ in outcomes],
        "results": [Jsonb(result) for _, _, result in outcomes],
        "job_ids": list(job_ids),
    }).fetchall()
    assert len({tuple(row["finished_jobs"]) for row in rows}) == 1
    return {str(row["task_id"]) for row in rows if row["task_id"] is not None}, set(rows[0]["finished_jobs"])


def test_one_batch_records_only_the_outcomes_whose_attempt_is_still_running(clean_db):
    conn = clean_db
    worker = register_worker(conn)
    ok, cancelled, superseded = (str(insert_task(conn)) for _ in range(3))
    running = {}
    for _ in range(3):
        claimed = fetch(conn, worker)["args"]["claimed"]
        running[claimed["task_id"]] = claimed["attempts"]
    assert set(running) == {ok, cancelled, superseded}
    conn.execute("SELECT * FROM asyncproc_cancel(%s)", (cancelled,))
    # The superseded attempt: cancelled, retried by an operator and claimed again as attempt 2.
    conn.execute("SELECT * FROM asyncproc_cancel(%s)", (superseded,))
    conn.execute("SELECT * FROM asyncproc_retry(%s)", (superseded,))
    again = fetch(conn, worker)["args"]["claimed"]
    assert again["task_id"] == superseded and again["attempts"] == 2
    never_claimed = str(insert_task(conn))

    recorded = complete_many(conn, [
        (ok, running[ok], {"v": "ok"}),
        (cancelled, running[cancelled], {"v": "late"}),
        (superseded, 1, {"v": "stale"}),
        (never_claimed, 0, {"v": "never"}),
    ])

    assert recorded == {ok}
    assert task_row(conn, ok)["status"] == "completed"
    assert conn.execute("SELECT result FROM tasks WHERE task_id = %s", (ok,)).fetchone()["result"] == {"v": "ok"}
    assert task_row(conn, cancelled)["status"] == "cancelled"
    assert task_row(conn, superseded)["status"] == "running"
    assert task_row(conn, superseded)["attempts"] == 2
    assert task_row(conn, never_claimed)["status"] == "pending"
    # The current attempt of the superseded task still records its own outcome.
    assert complete_many(conn, [(superseded, 2, None)]) == {superseded}


def test_a_repeated_outcome_is_recorded_once(clean_db):
    conn = clean_db
    worker = register_worker(conn)
    task_id = str(insert_task(conn))
    attempt = fetch(conn, worker)["args"]["claimed"]["attempts"]
    assert complete_many(conn, [(task_id, attempt, 1)]) == {task_id}
    assert complete_many(conn, [(task_id, attempt, 2)]) == set()
    assert conn.execute("SELECT result FROM tasks WHERE task_id = %s", (task_id,)).fetchone()["result"] == 1


def test_the_jobs_are_finished_with_their_outcomes_and_one_held_elsewhere_is_left_to_procrastinate(
    clean_db, database_url
):
    conn = clean_db
    worker = register_worker(conn)
    first, second, cancelled = (str(insert_task(conn)) for _ in range(3))
    jobs = {job["args"]["task_id"]: job for job in (fetch(conn, worker) for _ in range(3))}
    conn.execute("SELECT * FROM asyncproc_cancel(%s)", (cancelled,))
    outcomes = [(task_id, 1, task_id) for task_id in (first, second, cancelled)]
    with connect(database_url) as other:
        with other.transaction():
            other.execute("SELECT 1 FROM procrastinate_jobs WHERE id = %s FOR UPDATE", (jobs[second]["id"],))
            recorded, finished = complete_with_jobs(conn, outcomes, [job["id"] for job in jobs.values()])
    assert recorded == {first, second}
    # The cancelled task's run is over too: its job is finished, though its outcome is not recorded.
    assert finished == {jobs[first]["id"], jobs[cancelled]["id"]}
    left = conn.execute("SELECT id, status::text AS status FROM procrastinate_jobs").fetchall()
    assert left == [{"id": jobs[second]["id"], "status": "doing"}]


def test_a_batch_that_records_nothing_still_reports_the_jobs_it_finished(clean_db):
    conn = clean_db
    worker = register_worker(conn)
    task_id = str(insert_task(conn))
    job = fetch(conn, worker)
    conn.execute("SELECT * FROM asyncproc_cancel(%s)", (task_id,))
    assert complete_with_jobs(conn, [(task_id, 1, None)], [job["id"]]) == (set(), {job["id"]})
