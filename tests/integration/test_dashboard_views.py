"""The dashboard's sign-in redirect and its stream for many tasks, in process against the real PostgreSQL."""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize(
    ("path", "next_path"),
    [("/dashboard", "/dashboard"), ("/dashboard/tasks?status=failed", "/dashboard/tasks?status%3Dfailed")],
)
def test_the_sign_in_redirect_carries_the_page_and_its_query_only(guarded_app, path, next_path):
    asked = guarded_app.test_client().get(path)
    assert asked.status_code == 302
    assert asked.headers["Location"] == f"/dashboard/sign-in?next={next_path}"


def cancelled_task(conn) -> str:
    task_id = conn.execute(
        "INSERT INTO tasks (operation, scheduled_at) VALUES ('sleep', now() + interval '1 hour') RETURNING task_id"
    ).fetchone()["task_id"]
    conn.execute("SELECT asyncproc_cancel(%s)", (task_id,))
    return str(task_id)


def test_one_stream_carries_the_events_of_every_task_asked_for(open_app, conn):
    first, second = cancelled_task(conn), cancelled_task(conn)
    streamed = open_app.test_client().get(f"/dashboard/tasks/events?id={first}&id={second}")
    assert streamed.status_code == 200 and streamed.mimetype == "text/event-stream"
    documents = [
        json.loads(line.removeprefix("data: "))
        for line in streamed.get_data(as_text=True).splitlines()
        if line.startswith("data: ")
    ]
    # Both were final: each sends its state once, and the stream ends.
    assert sorted((doc["task_id"], doc["status"]) for doc in documents) == sorted(
        [(first, "cancelled"), (second, "cancelled")]
    )


@pytest.mark.parametrize("query", ["", "id=not-a-uuid", "&".join(["id=01a2498f-81d5-7632-8774-69498f220ca6"] * 51)])
def test_the_stream_refuses_what_is_not_a_page_of_task_ids(open_app, query):
    assert open_app.test_client().get(f"/dashboard/tasks/events?{query}").status_code == 400
