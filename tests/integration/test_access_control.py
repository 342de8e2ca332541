"""API keys, task ownership and rate limits, in process against the real PostgreSQL."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import uuid

import pytest

from asyncproc import keys, ratelimit
from asyncproc.api import create_app
from asyncproc.config import ApiSettings, DatabaseSettings, Settings

from tests.conftest import wait_for
from tests.support import bare_env

RATE = 0.01  # one token per 100 s: nothing refills during a test
BURST = 3


@pytest.fixture(scope="module")
def app(database_url):
    application = create_app(
        Settings(db=DatabaseSettings(url=database_url), api=ApiSettings(auth="required", rate_limit_per_second=RATE, rate_limit_burst=BURST))
    )
    yield application
    application.extensions["asyncproc"].close()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def new_key(conn):
    """A factory of fresh keys: each has its own owner id and a full bucket."""
    return lambda: keys.create(conn, f"test-{uuid.uuid4().hex[:12]}")


def post(client, key, body=None, headers=None):
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    return client.post("/process", json=body if body is not None else {"data": {"n": 3}}, headers={**auth, **(headers or {})})


def get(client, key, task_id):
    return client.get(f"/results/{task_id}", headers={"Authorization": f"Bearer {key}"})


def count_tasks(conn) -> int:
    return conn.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"]


@pytest.mark.parametrize(
    "authorization,invalid_token",
    [
        (None, False),
        ("Basic dXNlcjpwYXNz", False),
        ("Bearer ", False),
        ("Bearer apk_1_short", True),
        ("Bearer apk_999999_" + "A" * 43, True),
        ("Bearer ' OR 1=1 --", True),
    ],
    ids=["missing", "basic scheme", "empty bearer", "malformed key", "unknown id", "sql injection"],
)
def test_without_a_valid_key_the_answer_is_401_json_with_a_challenge(client, clean_db, authorization, invalid_token):
    headers = {"Authorization": authorization} if authorization else {}
    for response in (
        client.post("/process", json={"data": {}}, headers=headers),
        client.get(f"/results/{uuid.uuid4()}", headers=headers),
    ):
        assert response.status_code == 401
        assert response.get_json()["error"]["code"] == "unauthorized"
        challenge = response.headers["WWW-Authenticate"]
        assert challenge.startswith('Bearer realm="asyncproc"')
        assert ('error="invalid_token"' in challenge) is invalid_token
    assert count_tasks(clean_db) == 0


def test_a_key_with_the_right_id_but_a_wrong_secret_is_refused(client, new_key):
    key = new_key()
    forged = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert post(client, forged).status_code == 401
    assert post(client, key).status_code == 202


def test_health_and_openapi_need_no_key(client):
    assert client.get("/health").status_code == 200
    assert client.get("/openapi.json").status_code == 200


def test_a_task_is_visible_only_to_the_key_that_created_it(client, clean_db, new_key):
    alice, bob = new_key(), new_key()
    task_id = post(client, alice).get_json()["task_id"]
    assert get(client, alice, task_id).status_code == 200
    hidden = get(client, bob, task_id)
    missing = get(client, bob, uuid.uuid4())
    assert hidden.status_code == missing.status_code == 404
    assert hidden.get_json()["error"]["code"] == missing.get_json()["error"]["code"] == "task_not_found"
    owner = clean_db.execute("SELECT owner FROM tasks WHERE task_id = %s", (task_id,)).fetchone()["owner"]
    assert owner == keys.verify(clean_db, alice).id


def test_tasks_without_an_owner_are_visible_to_no_key(client, clean_db, new_key):
    task_id = clean_db.execute("INSERT INTO tasks (operation) VALUES ('compute') RETURNING task_id").fetchone()["task_id"]
    assert get(client, new_key(), task_id).status_code == 404


def test_idempotency_keys_are_scoped_per_key(client, clean_db, new_key):
    alice, bob = new_key(), new_key()
    headers = {"Idempotency-Key": f"order-{uuid.uuid4()}"}
    first = post(client, alice, headers=headers)
    assert first.status_code == 202
    assert post(client, alice, headers=headers).get_json()["task_id"] == first.get_json()["task_id"]
    # Bob's "order-..." is his own: a task of his, nothing of Alice's seen or refused.
    bobs = post(client, bob, headers=headers)
    assert bobs.status_code == 202
    assert bobs.get_json()["task_id"] != first.get_json()["task_id"]
    assert post(client, bob, headers=headers).get_json()["task_id"] == bobs.get_json()["task_id"]
    assert count_tasks(clean_db) == 2


def test_a_revoked_key_is_refused(client, conn):
    name = f"test-{uuid.uuid4().hex[:12]}"
    key = keys.create(conn, name)
    assert post(client, key).status_code == 202
    assert keys.revoke(conn, name)
    assert post(client, key).status_code == 401


def test_keys_are_stored_hashed_and_never_logged(client, conn, new_key, caplog):
    caplog.set_level(logging.DEBUG)
    key = new_key()
    post(client, key)
    post(client, key[:-2] + "xx")
    # apk_<id>_<secret>, and the secret itself may hold "_".
    secret = key.split("_", 2)[2]
    stored = json.dumps([row for row in conn.execute("SELECT to_jsonb(api_keys) AS r FROM api_keys")])
    assert secret not in stored and key not in stored
    assert secret not in caplog.text


def test_the_rate_limit_answers_429_with_retry_after_per_key(client, clean_db, new_key):
    alice, bob = new_key(), new_key()
    assert [post(client, alice).status_code for _ in range(BURST)] == [202] * BURST
    limited = post(client, alice)
    assert limited.status_code == 429
    assert limited.get_json()["error"]["code"] == "rate_limited"
    retry_after = int(limited.headers["Retry-After"])
    assert 1 <= retry_after <= 1 / RATE
    assert limited.get_json()["error"]["details"] == {"retry_after": retry_after}
    assert count_tasks(clean_db) == BURST
    # Reads spend the same bucket; another key has its own.
    assert get(client, alice, uuid.uuid4()).status_code == 429
    assert post(client, bob).status_code == 202


def test_the_keys_cli_prints_a_key_once_lists_and_revokes(database_url):
    name = f"cli-{uuid.uuid4().hex[:8]}"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "asyncproc.cli", "keys", *args],
            env=bare_env(DATABASE_URL=database_url),
            capture_output=True,
            text=True,
        )

    created = cli("create", name)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("apk_")
    listed = cli("list")
    assert f"{name}\t" in listed.stdout and key not in listed.stdout
    assert cli("create", name).returncode == 1
    assert cli("revoke", name).returncode == 0
    assert cli("revoke", name).returncode == 1
    assert "revoked" in [line for line in cli("list").stdout.splitlines() if line.startswith(name + "\t")][0]


def test_a_bucket_refills_at_the_configured_rate(conn):
    bucket = f"test:{uuid.uuid4()}"
    assert [ratelimit.take(conn, bucket, rate=1, burst=2).allowed for _ in range(2)] == [True, True]
    refused = ratelimit.take(conn, bucket, rate=1, burst=2)
    assert refused == ratelimit.Decision(allowed=False, retry_after=1)
    wait_for(lambda: ratelimit.take(conn, bucket, rate=1, burst=2).allowed, 3, "a token to refill")
    assert not ratelimit.take(conn, bucket, rate=1, burst=2).allowed
