"""Per-key quotas set with `asyncproc keys limit`, rate limits before
authentication, and bucket pruning, in process against the real PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from asyncproc import keys, ratelimit
from asyncproc.api import create_app
from asyncproc.config import ApiSettings, DatabaseSettings, Settings
from asyncproc.quotas import Quota
from tests.support import bare_env


@pytest.fixture(scope="module")
def app(database_url):
    application = create_app(Settings(db=DatabaseSettings(url=database_url), api=ApiSettings(auth="required")))
    yield application
    application.extensions["asyncproc"].close()


@pytest.fixture
def limited_key(conn, database_url):
    """A fresh key with a quota set through the CLI, as an operator would."""
    name = f"quota-{uuid.uuid4().hex[:12]}"
    key = keys.create(conn, name)
    result = subprocess.run(
        [sys.executable, "-m", "asyncproc.cli", "keys", "limit", name,
         "--max-active", "3", "--max-priority", "10", "--max-batch", "2", "--max-timeout-seconds", "60"],
        env=bare_env(DATABASE_URL=database_url), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "max_active_tasks=3" in result.stdout
    return key


def _post(app, key, path, body):
    return app.test_client().post(path, json=body, headers={"Authorization": f"Bearer {key}"})


def test_over_quota_is_429_with_a_clear_message(app, clean_db, limited_key):
    high = _post(app, limited_key, "/process", {"data": {"n": 1}, "priority": 11})
    assert high.status_code == 429
    assert high.get_json()["error"]["code"] == "quota_exceeded"
    assert "priority 10 at most" in high.get_json()["error"]["message"]
    big = _post(app, limited_key, "/process/batch", {"tasks": [{"data": {"n": 1}}] * 3})
    assert big.status_code == 429
    assert "at most 2 tasks per batch" in big.get_json()["error"]["message"]

    assert _post(app, limited_key, "/process/batch", {"tasks": [{"data": {"n": 1}}] * 2}).status_code == 202
    assert _post(app, limited_key, "/process", {"data": {"n": 1}, "priority": 10}).status_code == 202
    full = _post(app, limited_key, "/process", {"data": {"n": 1}})
    assert full.status_code == 429
    assert "3 tasks pending or running at most" in full.get_json()["error"]["message"]
    assert clean_db.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"] == 3


def test_a_timeout_seconds_over_the_quota_is_refused():
    from asyncproc.errors import QuotaExceeded
    from asyncproc.quotas import check_request

    check_request(Quota(max_timeout_seconds=60), [{"timeout_seconds": 60}])
    with pytest.raises(QuotaExceeded, match="timeout_seconds 60 at most"):
        check_request(Quota(max_timeout_seconds=60), [{"timeout_seconds": 61}])


def test_bad_keys_are_rate_limited_per_address_before_any_key_lookup(database_url, clean_db):
    app = create_app(
        Settings(db=DatabaseSettings(url=database_url), api=ApiSettings(auth="required", address_rate_limit_per_second=0.01, address_rate_limit_burst=3))
    )
    try:
        client = app.test_client()
        bad = {"Authorization": "Bearer apk_1_" + "A" * 43}
        statuses = [client.post("/process", json={"data": {}}, headers=bad, environ_base={"REMOTE_ADDR": "10.9.9.9"}).status_code for _ in range(5)]
        assert statuses == [401, 401, 401, 429, 429]
        # Another address has its own bucket.
        assert client.post("/process", json={"data": {}}, headers=bad, environ_base={"REMOTE_ADDR": "10.9.9.10"}).status_code == 401
    finally:
        app.extensions["asyncproc"].close()


def test_behind_a_trusted_proxy_the_bucket_is_the_forwarded_client(database_url, clean_db):
    app = create_app(
        Settings(db=DatabaseSettings(url=database_url), api=ApiSettings(rate_limit_per_second=0.01, rate_limit_burst=1, trusted_proxies=("10.0.0.0/8",)))
    )
    try:
        client = app.test_client()

        def status(forwarded: str, peer: str = "10.1.1.1") -> int:
            return client.get(
                f"/results/{uuid.uuid4()}", headers={"X-Forwarded-For": forwarded}, environ_base={"REMOTE_ADDR": peer}
            ).status_code

        assert status("203.0.113.7") == 404
        assert status("203.0.113.7") == 429
        # A different client behind the same balancer is not limited by the first.
        assert status("203.0.113.8") == 404
        # The client's own claims, left of the last untrusted hop, change nothing.
        assert status("1.2.3.4, 203.0.113.7") == 429
        # An untrusted peer's X-Forwarded-For is ignored: its bucket is its own address.
        assert status("203.0.113.9", peer="198.51.100.1") == 404
        assert status("203.0.113.10", peer="198.51.100.1") == 429
    finally:
        app.extensions["asyncproc"].close()


def test_buckets_that_have_refilled_are_pruned(conn):
    bucket = f"test:{uuid.uuid4()}"
    ratelimit.take(conn, bucket, rate=1000, burst=1)
    conn.execute("UPDATE api_rate_buckets SET updated_at = updated_at - interval '5 seconds' WHERE bucket = %s", (bucket,))
    ratelimit.prune(conn, [(1000, 1), (1, 1)])
    assert conn.execute("SELECT count(*) AS n FROM api_rate_buckets WHERE bucket = %s", (bucket,)).fetchone()["n"] == 0


def test_concurrent_requests_of_one_key_cannot_pass_its_quota_together(app, clean_db, limited_key):
    barrier = threading.Barrier(12)

    def post(path: str, body: dict) -> int:
        barrier.wait(10)
        return _post(app, limited_key, path, body).status_code

    bodies = [("/process", {"data": {"n": i}}) if i % 2 else ("/process/batch", {"tasks": [{"data": {"n": i}}]})
              for i in range(12)]
    with ThreadPoolExecutor(max_workers=12) as pool:
        codes = list(pool.map(lambda args: post(*args), bodies))
    assert sorted(codes) == [202] * 3 + [429] * 9
    assert clean_db.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"] == 3
