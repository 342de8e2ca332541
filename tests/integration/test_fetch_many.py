"""Several jobs per fetch (migrations/0017, worker/app.py): one statement for every free slot, and a stopping
worker returns the jobs it fetched but never started, with their attempts back."""

from __future__ import annotations

import asyncio

import procrastinate

from asyncproc import db
from tests.support import fetch, new_owner, queue, register_worker, task_row
from asyncproc.config import DatabaseSettings, WorkerSettings
from worker.app import QUEUE, JobManager
from worker.lease import Lease


def fetch_many(conn, worker_id: int, how_many: int) -> list[dict]:
    params = {"queues": [QUEUE], "worker_id": worker_id, "how_many": how_many}
    return conn.execute(db.query("jobs_fetch"), params).fetchall()


def test_one_fetch_claims_up_to_how_many_in_queue_order(clean_db):
    task_ids = queue(clean_db, None, 5)
    jobs = fetch_many(clean_db, register_worker(clean_db), 3)
    assert [job["args"]["task_id"] for job in jobs] == task_ids[:3]
    assert [task_row(clean_db, task_id)["status"] for task_id in task_ids] == ["running"] * 3 + ["pending"] * 2
    assert [job["args"]["task_id"] for job in fetch_many(clean_db, register_worker(clean_db), 10)] == task_ids[3:]
    assert fetch_many(clean_db, register_worker(clean_db), 10) == []


def test_each_pick_of_one_fetch_is_fair_between_keys(clean_db):
    busy, other = new_owner(clean_db), new_owner(clean_db)
    queue(clean_db, busy, 100)
    waiting = queue(clean_db, other, 2)
    worker_id = register_worker(clean_db)
    fetch(clean_db, worker_id)
    owners = [job["args"]["claimed"]["owner"] for job in fetch_many(clean_db, worker_id, 4)]
    # The other key has nothing running, so it goes first; then the keys take turns, within the one fetch.
    assert owners == [other, busy, other, busy]
    assert {task_row(clean_db, task_id)["status"] for task_id in waiting} == {"running"}


def test_returned_jobs_put_their_tasks_back_with_the_attempt_not_counted(clean_db):
    task_ids = queue(clean_db, None, 3)
    jobs = fetch_many(clean_db, register_worker(clean_db), 3)
    returned = clean_db.execute(db.query("jobs_return"), {"job_ids": [job["id"] for job in jobs]}).fetchone()
    assert returned["returned"] == 3
    for task_id in task_ids:
        row = task_row(clean_db, task_id)
        assert (row["status"], row["attempts"]) == ("pending", 0)
        assert "not started" in row["error_message"]
    queued = clean_db.execute("SELECT status::text AS status, args->>'task_id' AS task_id FROM procrastinate_jobs").fetchall()
    assert sorted(queued, key=lambda job: job["task_id"]) == sorted(
        ({"status": "todo", "task_id": task_id} for task_id in task_ids), key=lambda job: job["task_id"]
    )


def test_the_job_manager_fetches_for_its_free_slots_and_returns_what_it_did_not_hand_out(clean_db, database_url):
    task_ids = queue(clean_db, None, 8)

    async def run() -> list[str]:
        connector = procrastinate.PsycopgConnector(conninfo=database_url)
        await connector.open_async()
        try:
            lease = Lease(DatabaseSettings(url=database_url), WorkerSettings(), on_fence=lambda why: None)
            await asyncio.to_thread(lease.acquire)
            manager = JobManager(connector, concurrency=5, lease=lease, finished=set(), abandoned=set())
            worker_id = await manager.register_worker()
            handed = [await manager.fetch_job([QUEUE], worker_id) for _ in range(2)]
            await manager.unregister_worker(worker_id)
            return [job.task_kwargs["task_id"] for job in handed]
        finally:
            await connector.close_async()

    handed = asyncio.run(run())
    # One statement fetched five, for five free slots; two were handed out before the stop.
    assert handed == task_ids[:2]
    statuses = [task_row(clean_db, task_id)["status"] for task_id in task_ids]
    assert statuses == ["running"] * 2 + ["pending"] * 6
    assert [task_row(clean_db, task_id)["attempts"] for task_id in task_ids[2:]] == [0] * 6
