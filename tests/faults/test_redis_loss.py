"""Redis stopped, flushed and restarted under load: slower, never wrong."""

from __future__ import annotations

import time

import pytest

from asyncproc.cache import KEY_PREFIX
from tests.conftest import wait_for
from tests.faults.load import Load

pytestmark = pytest.mark.faults

EXPECTED_RESULT = sum(range(1000))


def _cached(client, task_ids: list[str]) -> int:
    """Results in the cache; an invalidation's tombstone holds no document."""
    return sum(bool(client.hget(KEY_PREFIX + task_id, "d")) for task_id in task_ids)


def test_redis_loss_under_load_costs_no_errors_and_the_cache_refills(fleet, redis_server, cluster):
    service, _ = fleet.api()
    fleet.worker("worker-1")
    client = redis_server.client()
    load = Load(service.base_url).start()
    wait_for(lambda: _cached(client, load.accepted[:20]) >= 10, 30, "finished results to reach the cache", interval=0.1)

    client.flushall()
    redis_server.stop()
    down_at = time.monotonic()
    wait_for(lambda: sum(a.at > down_at + 2 for a in load.answers) >= 20, 30, "answers while Redis is down", interval=0.1)
    redis_server.start()
    back_at = time.monotonic()
    assert _cached(client, load.accepted) == 0
    wait_for(lambda: sum(a.at > back_at + 1 for a in load.answers) >= 20, 30, "answers after Redis returns", interval=0.1)
    load.stop()

    assert [a for a in load.answers if not 200 <= a.status < 300] == []
    finished_after = [a.body["task_id"] for a in load.answers if a.method == "POST" and a.at > back_at]
    for task_id in load.accepted:
        body = service.wait_finished(task_id, 30)
        assert (body["status"], body["result"]) == ("completed", EXPECTED_RESULT)
    assert all(row["status"] == "completed" for row in cluster.tasks(load.accepted).values())
    wait_for(
        lambda: _cached(client, finished_after) == len(finished_after),
        10,
        "every task finished since Redis returned to be cached again",
        interval=0.1,
    )
