"""GET /metrics of an in-process app on a database no worker serves, so that
pending tasks stay pending and the queue figures are exact."""

from __future__ import annotations

from typing import Iterator

import psycopg
import pytest
from psycopg.rows import dict_row
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from asyncproc import db
from asyncproc.api import create_app
from asyncproc.config import DatabaseSettings, Settings
from tests.conftest import WORKER_OPTIONS, free_port
from tests.support import migrated_database


@pytest.fixture(scope="module")
def idle_database(empty_database) -> str:
    return migrated_database(empty_database)


@pytest.fixture(scope="module")
def app(idle_database) -> Iterator[Flask]:
    application = create_app(Settings(db=DatabaseSettings(url=idle_database)))
    yield application
    application.extensions["asyncproc"].close()


def scrape(client) -> dict[tuple[str, frozenset], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type == "text/plain; version=0.0.4; charset=utf-8"
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.get_data(as_text=True))
        for s in family.samples
    }


def test_queue_depth_and_oldest_age_count_due_pending_tasks_only(app, idle_database):
    with db.connect(idle_database) as conn:
        conn.execute(
            "INSERT INTO tasks (operation, scheduled_at) VALUES"
            " ('compute', now() - interval '90 seconds'), ('compute', now() - interval '5 seconds'),"
            " ('sleep', now() + interval '1 hour')"
        )
    samples = scrape(app.test_client())
    assert samples[("asyncproc_queue_depth", frozenset())] == 2
    assert samples[("asyncproc_queue_scheduled", frozenset())] == 1
    assert 90 <= samples[("asyncproc_queue_oldest_age_seconds", frozenset())] < 120
    assert samples[("asyncproc_tasks", frozenset({("operation", "compute"), ("status", "pending")}))] == 2
    assert samples[("asyncproc_tasks_enqueued_total", frozenset({("operation", "sleep")}))] == 1


def test_requests_are_counted_per_route_not_per_path(app):
    client = app.test_client()
    for path in ("/results/a", "/results/b", "/nowhere"):
        assert client.get(path).status_code == 404
    samples = scrape(client)
    route = frozenset({("method", "GET"), ("route", "/results/<raw_id>"), ("status", "404")})
    unmatched = frozenset({("method", "GET"), ("route", "unmatched"), ("status", "404")})
    assert samples[("asyncproc_http_requests_total", route)] == 2
    assert samples[("asyncproc_http_requests_total", unmatched)] == 1


def test_with_the_database_gone_metrics_still_answer_and_say_so():
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/none"
    application = create_app(Settings(db=DatabaseSettings(url=unreachable, connect_timeout=1)))
    try:
        samples = scrape(application.test_client())
    finally:
        application.extensions["asyncproc"].close()
    assert samples[("asyncproc_database_up", frozenset())] == 0
    assert not any(name.startswith("asyncproc_queue") for name, _ in samples)


def test_run_time_and_queue_wait_histograms_come_from_the_ledger(app, idle_database):
    with psycopg.connect(idle_database, autocommit=True, options=WORKER_OPTIONS, row_factory=dict_row) as conn:
        task_id = conn.execute(
            "INSERT INTO tasks (operation, scheduled_at) VALUES ('timed', now() - interval '60 seconds') RETURNING task_id"
        ).fetchone()["task_id"]
        # As a worker would: it started 3 s ago, 57 s after it became due, and completes now.
        conn.execute(
            "UPDATE tasks SET status = 'running', attempts = 1, started_at = now() - interval '3 seconds' WHERE task_id = %s",
            (task_id,),
        )
        conn.execute("UPDATE tasks SET status = 'completed' WHERE task_id = %s", (task_id,))
    samples = scrape(app.test_client())

    def bucket(name: str, le: str) -> float:
        return samples[(f"{name}_bucket", frozenset({("operation", "timed"), ("le", le)}))]

    run, wait = "asyncproc_ledger_run_seconds", "asyncproc_ledger_queue_wait_seconds"
    assert (bucket(run, "2.5"), bucket(run, "5.0"), bucket(run, "+Inf")) == (0, 1, 1)
    assert 3 <= samples[(f"{run}_sum", frozenset({("operation", "timed")}))] < 5
    assert (bucket(wait, "30.0"), bucket(wait, "60.0"), bucket(wait, "+Inf")) == (0, 1, 1)
    assert samples[(f"{wait}_count", frozenset({("operation", "timed")}))] == 1
    # Pending tasks have neither figure yet.
    assert (f"{run}_count", frozenset({("operation", "sleep")})) not in samples



def test_counters_only_grow_across_retries_pruning_and_truncation(app, idle_database):
    client = app.test_client()

    def counters() -> tuple[float, float, float, float]:
        samples = scrape(client)
        label = frozenset({("operation", "monotonic")})
        return tuple(samples.get((f"asyncproc_tasks_{name}_total", label), 0) for name in ("enqueued", "completed", "failed"))\
            + (samples.get(("asyncproc_ledger_run_seconds_count", label), 0),)

    with db.connect(idle_database) as operator, psycopg.connect(
        idle_database, autocommit=True, options=WORKER_OPTIONS, row_factory=dict_row
    ) as worker:
        first, second = (row["task_id"] for row in operator.execute(
            "INSERT INTO tasks (operation) VALUES ('monotonic'), ('monotonic') RETURNING task_id").fetchall())
        for task_id, outcome in ((first, "failed"), (second, "completed")):
            worker.execute("UPDATE tasks SET status = 'running', attempts = 1, started_at = now() WHERE task_id = %s", (task_id,))
            worker.execute("UPDATE tasks SET status = %s WHERE task_id = %s", (outcome, task_id))
        assert counters() == (2, 1, 1, 2)
        operator.execute("SELECT asyncproc_retry(%s)", (first,))
        assert counters() == (2, 1, 1, 2)
        operator.execute("DELETE FROM tasks WHERE task_id = %s", (second,))
        operator.execute("SELECT asyncproc_compact()")
        assert counters() == (2, 1, 1, 2)
        samples = scrape(client)
        assert samples[("asyncproc_tasks", frozenset({("operation", "monotonic"), ("status", "completed")}))] == 0
        assert samples[("asyncproc_tasks", frozenset({("operation", "monotonic"), ("status", "pending")}))] == 1
        operator.execute("TRUNCATE tasks CASCADE")
        assert counters() == (2, 1, 1, 2)
