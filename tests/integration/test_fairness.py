"""Fairness between API keys at the fetch (migrations/0015): one key's backlog cannot starve another's tasks.

Every test drives the worker's own fetch (asyncproc_fetch_job) from
connections of its own, as several workers would.
"""

from __future__ import annotations

import threading

import psycopg

from tests.support import connect, fetch, new_owner, queue, register_worker


def fetched_owner(job: dict) -> int | None:
    return job["args"]["claimed"]["owner"]


def test_a_job_carries_its_tasks_owner_and_an_anonymous_one_none(clean_db):
    owner = new_owner(clean_db)
    (owned,) = queue(clean_db, owner)
    (anonymous,) = queue(clean_db, None)
    args = {
        row["queueing_lock"]: row["args"]
        for row in clean_db.execute("SELECT queueing_lock, args FROM procrastinate_jobs WHERE status = 'todo'")
    }
    assert args == {owned: {"task_id": owned, "owner": owner}, anonymous: {"task_id": anonymous}}


def test_another_keys_task_goes_before_a_busy_keys_backlog(clean_db):
    busy, other = new_owner(clean_db), new_owner(clean_db)
    backlog = queue(clean_db, busy, 10_000)
    worker_id = register_worker(clean_db)
    # The busy key has tasks running, as a worker taken up by its backlog would.
    for _ in range(3):
        assert fetched_owner(fetch(clean_db, worker_id)) == busy
    (waiting,) = queue(clean_db, other)
    job = fetch(clean_db, worker_id)
    assert job["args"]["task_id"] == waiting
    # Then the busy key's backlog again, oldest first.
    assert fetch(clean_db, worker_id)["args"]["task_id"] == backlog[3]


def test_the_key_with_fewer_tasks_running_goes_first_and_equal_keys_take_turns(clean_db):
    first, second = new_owner(clean_db), new_owner(clean_db)
    queue(clean_db, first, 50)
    queue(clean_db, second, 50)
    worker_id = register_worker(clean_db)
    owners = [fetched_owner(fetch(clean_db, worker_id)) for _ in range(20)]
    # The first key's jobs are older: it starts, and from then on neither key is ever two ahead.
    assert owners[0] == first
    for taken in range(1, len(owners) + 1):
        assert abs(owners[:taken].count(first) - owners[:taken].count(second)) <= 1, owners


def test_within_one_key_and_without_keys_the_order_is_the_queues(clean_db):
    owner = new_owner(clean_db)
    owned = queue(clean_db, owner, 5)
    worker_id = register_worker(clean_db)
    assert [fetch(clean_db, worker_id)["args"]["task_id"] for _ in range(5)] == owned
    anonymous = queue(clean_db, None, 5)
    assert [fetch(clean_db, worker_id)["args"]["task_id"] for _ in range(5)] == anonymous


def test_a_higher_priority_goes_first_whoever_has_tasks_running(clean_db):
    busy, other = new_owner(clean_db), new_owner(clean_db)
    queue(clean_db, busy, 3)
    worker_id = register_worker(clean_db)
    fetch(clean_db, worker_id)
    (urgent,) = queue(clean_db, busy, priority=5)
    queue(clean_db, other)
    assert fetch(clean_db, worker_id)["args"]["task_id"] == urgent


def test_a_key_whose_only_task_is_not_due_does_not_hold_up_the_fetch(clean_db):
    busy, later = new_owner(clean_db), new_owner(clean_db)
    backlog = queue(clean_db, busy, 3)
    worker_id = register_worker(clean_db)
    fetch(clean_db, worker_id)
    (scheduled,) = queue(clean_db, later)
    clean_db.execute("UPDATE tasks SET scheduled_at = now() + interval '1 hour' WHERE task_id = %s", (scheduled,))
    assert fetch(clean_db, worker_id)["args"]["task_id"] == backlog[1]


def test_concurrent_fetches_of_two_keys_take_every_job_once(clean_db, database_url):
    first, second = new_owner(clean_db), new_owner(clean_db)
    queued = set(queue(clean_db, first, 300)) | set(queue(clean_db, second, 300))
    taken: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def drain() -> None:
        try:
            with connect(database_url) as conn:
                worker_id = register_worker(conn)
                while (job := fetch(conn, worker_id)) is not None:
                    assert job["args"]["claimed"] is not None
                    with lock:
                        taken.append(job["args"]["task_id"])
        except (AssertionError, psycopg.Error) as exc:
            errors.append(exc)

    threads = [threading.Thread(target=drain) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    assert sorted(taken) == sorted(queued)
    running = clean_db.execute("SELECT count(*) AS n FROM tasks WHERE status = 'running'").fetchone()["n"]
    assert running == len(queued)
