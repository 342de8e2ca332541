"""Versioned cache entries: a stale put never replaces a newer state, and
invalidations do not wait for the circuit breaker."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

from asyncproc import service
from asyncproc.api import create_app
from asyncproc.cache import ResultCache, version_of
from asyncproc.config import CacheSettings, DatabaseSettings, Settings

from tests.conftest import wait_for

T1 = datetime(2030, 1, 1, tzinfo=timezone.utc)


def test_a_put_older_than_an_invalidation_is_refused(redis_url):
    cache = ResultCache(redis_url, 60)
    task_id = uuid.uuid4()
    cache.put(task_id, b'{"status":"failed"}', T1)
    assert cache.get(task_id) == b'{"status":"failed"}'
    # A retry (version T2) invalidates; a reader that read the failed row before it puts it back late.
    cache.invalidate(task_id, version_of(T1 + timedelta(seconds=1)))
    cache.put(task_id, b'{"status":"failed"}', T1)
    assert cache.get(task_id) is None
    # The next final state is newer, and is cached.
    cache.put(task_id, b'{"status":"completed"}', T1 + timedelta(seconds=2))
    assert cache.get(task_id) == b'{"status":"completed"}'
    cache.put(task_id, b'{"status":"failed"}', T1)
    assert cache.get(task_id) == b'{"status":"completed"}'


def test_an_invalidation_is_written_while_the_breaker_is_open(redis_url):
    cache = ResultCache(redis_url, 60)
    task_id = uuid.uuid4()
    cache.put(task_id, b'{"status":"failed"}', T1)
    cache._breaker.failed("test", RuntimeError("a timeout a moment ago"))
    cache.invalidate(task_id, version_of(T1 + timedelta(seconds=1)))
    wait_for(cache._breaker.closed, 5, "the cool-down to pass")
    assert cache.get(task_id) is None


def test_a_retry_from_psql_invalidates_with_its_version_so_a_late_stale_put_is_refused(
    database_url, redis_url, clean_db, worker_conn
):
    app = create_app(Settings(db=DatabaseSettings(url=database_url), cache=CacheSettings(url=redis_url)))
    res = app.extensions["asyncproc"]
    try:
        wait_for(lambda: res.events.connected, 10, "the listener")
        task_id = clean_db.execute("INSERT INTO tasks (operation) VALUES ('compute') RETURNING task_id").fetchone()["task_id"]
        worker_conn.execute("UPDATE tasks SET status = 'running', attempts = 1 WHERE task_id = %s", (task_id,))
        worker_conn.execute("UPDATE tasks SET status = 'failed', error_message = 'boom' WHERE task_id = %s", (task_id,))
        # A reader reads the failed row ...
        with res.pool.connection() as conn:
            stale = service.owned_task(conn, task_id, None)
        # ... an operator retries it with psql ...
        clean_db.execute("SELECT asyncproc_retry(%s)", (task_id,))
        wait_for(lambda: res.cache._client.hget(f"asyncproc:result:v2:{task_id}", "v"), 10, "the tombstone")
        # ... and the reader's put, late, is refused: the retried task is never served as failed.
        res.cache.put(task_id, service.encode_document(stale), stale.updated_at)
        assert res.cache.get(task_id) is None
        assert app.test_client().get(f"/results/{task_id}").get_json()["status"] == "pending"
    finally:
        res.close()


def test_a_tombstone_lives_a_minute_not_the_result_ttl(redis_url):
    cache = ResultCache(redis_url, 3600)
    task_id = uuid.uuid4()
    cache.invalidate(task_id, version_of(T1))
    ttl = cache._client.ttl(f"asyncproc:result:v2:{task_id}")
    assert 0 < ttl <= 60
