"""Group commit (asyncproc/group_commit.py): concurrent single-task requests share an INSERT and a commit, and
each still gets its own answer: its task, its Idempotency-Key's verdict, or its own error."""

from __future__ import annotations

import threading
import uuid
from typing import Any, Iterator

import psycopg
import pytest

from asyncproc import db
from asyncproc.config import DatabaseSettings
from asyncproc.group_commit import GroupCommit
from asyncproc.ledger import NewTask
from tests.conftest import wait_for


@pytest.fixture
def pool(database_url) -> Iterator:
    opened = db.open_pool(DatabaseSettings(url=database_url), "test-group-commit", 1)
    yield opened
    opened.close()


def new_task(n: int, **fields: Any) -> NewTask:
    return NewTask(operation="compute", payload={"n": n}, max_attempts=3, request_id=f"req-{n}", **fields)


class Submitted(threading.Thread):
    def __init__(self, inserts: GroupCommit, new: NewTask):
        super().__init__()
        self.inserts, self.new = inserts, new
        self.task = self.error = None

    def run(self) -> None:
        try:
            self.task = self.inserts.insert(self.new)
        except psycopg.Error as exc:
            self.error = exc


def test_requests_that_arrive_together_share_one_statement_and_each_gets_its_own_task(clean_db, pool):
    inserts = GroupCommit(pool)
    requests = [Submitted(inserts, new_task(n)) for n in range(40)]
    for request in requests:
        request.start()
    for request in requests:
        request.join(30)
    assert [request.error for request in requests] == [None] * 40
    for n, request in enumerate(requests):
        assert (request.task.payload, request.task.request_id, request.task.status) == ({"n": n}, f"req-{n}", "pending")
    assert len({request.task.task_id for request in requests}) == 40
    stored = clean_db.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"]
    jobs = clean_db.execute("SELECT count(*) AS n FROM procrastinate_jobs WHERE status = 'todo'").fetchone()["n"]
    assert (stored, jobs) == (40, 40)
    # One pooled connection: while one statement runs, the requests behind it gather for the next.
    assert inserts.writes < 40


def test_in_one_group_a_taken_key_and_a_refused_row_answer_only_their_own_request(clean_db, pool):
    inserts = GroupCommit(pool)
    key = uuid.uuid4().hex
    with pool.connection():
        # The pool's one connection is held: the first request leads a group of its own and waits
        # for it; the next three queue behind it and go together in the following statement.
        first = Submitted(inserts, new_task(0))
        first.start()
        wait_for(lambda: inserts.writes == 1, 10, "the first request to start its write")
        same_key = [Submitted(inserts, new_task(n, idempotency_key=key)) for n in (1, 2)]
        refused = Submitted(inserts, new_task(3, callback_url="ftp://example.com/"))
        for request in (*same_key, refused):
            request.start()
        wait_for(lambda: len(inserts._queued) == 3, 10, "three requests to queue behind the first")
    for request in (first, *same_key, refused):
        request.join(30)
    assert first.task is not None and first.error is None
    created = [request for request in same_key if request.task is not None]
    assert len(created) == 1 and all(request.error is None for request in same_key)
    assert isinstance(refused.error, psycopg.errors.CheckViolation) and refused.task is None
    stored = clean_db.execute("SELECT payload->>'n' AS n FROM tasks").fetchall()
    assert sorted(row["n"] for row in stored) == ["0", str(created[0].task.payload["n"])]
    # The group was written again one request at a time, after its statement was refused.
    assert inserts.writes == 2 + 3
