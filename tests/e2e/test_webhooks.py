"""Completion webhooks from real workers to a receiver on 127.0.0.1 (allowed explicitly)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest
import requests

from asyncproc import keys
from asyncproc.webhooks import SIGNATURE_HEADER, verify_signature
from tests.conftest import wait_for
from tests.e2e.conftest import Service, _start, service_env, start_service, stop_service
from tests.support import bare_env

pytestmark = pytest.mark.e2e

GLOBAL_SECRET = "global-callback-secret-of-the-e2e-tests"
MAX_AGE_SECONDS = 4


class Receiver:
    """Records every call. /ok answers 200, /flaky/N 500 to its first N calls, /down always 500."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.hits: Counter[str] = Counter()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.hits[self.path] += 1
                receiver.calls.append({"path": self.path, "headers": dict(self.headers), "body": body})
                failing = self.path == "/down" or (
                    self.path.startswith("/flaky/") and receiver.hits[self.path] <= int(self.path.split("/")[2])
                )
                self.send_response(500 if failing else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def calls_to(self, path: str) -> list[dict]:
        return [call for call in self.calls if call["path"] == path]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    made = Receiver()
    yield made
    made.server.shutdown()


@pytest.fixture(scope="module")
def hooked(tmp_path_factory, database_url) -> Iterator[Service]:
    """API with access control, and two workers, allowed to call 127.0.0.1 only."""
    logs = tmp_path_factory.mktemp("hooked")
    env = {
        "ASYNCPROC_AUTH": "required",
        "ASYNCPROC_CALLBACK_ALLOW": "127.0.0.1",
        "ASYNCPROC_CALLBACK_SECRET": GLOBAL_SECRET,
        "ASYNCPROC_CALLBACK_BACKOFF_SECONDS": "0.05",
        "ASYNCPROC_CALLBACK_POLL_SECONDS": "0.05",
        "ASYNCPROC_CALLBACK_MAX_AGE_SECONDS": str(MAX_AGE_SECONDS),
    }
    running, processes = start_service(logs, database_url, None, extra_env=env)
    processes.append(_start(["worker", "--concurrency", "4"], service_env(database_url, None, env), logs / "worker-2.log"))
    yield running
    assert stop_service(processes) == [0, 0, 0], f"a process did not exit cleanly; logs in {running.logs}"


@pytest.fixture
def key(conn) -> tuple[str, str]:
    """A new API key and its callback secret."""
    made = keys.create(conn, f"hooks-{uuid.uuid4().hex[:12]}")
    secret = conn.execute("SELECT callback_secret FROM api_keys WHERE id = %s", (keys.verify(conn, made).id,)).fetchone()
    return made, secret["callback_secret"]


def submit(service: Service, api_key: str, body: dict) -> requests.Response:
    return service.post(body, headers={"Authorization": f"Bearer {api_key}"})


def deliveries(service: Service, api_key: str, task_id: str) -> list[dict]:
    response = requests.get(
        f"{service.base_url}/results/{task_id}/callbacks", headers={"Authorization": f"Bearer {api_key}"}, timeout=10
    )
    assert response.status_code == 200, response.text
    return response.json()["callbacks"]


def test_a_finished_task_is_posted_signed_with_its_keys_secret(hooked, receiver, key, conn):
    api_key, secret = key
    created = submit(hooked, api_key, {"data": {"n": 100}, "callback_url": f"{receiver.base_url}/ok"})
    assert created.status_code == 202, created.text
    task_id = created.json()["task_id"]

    def delivered():
        return [call for call in receiver.calls_to("/ok") if json.loads(call["body"])["task_id"] == task_id]

    (call,) = wait_for(delivered, 20, f"the callback of {task_id} (logs in {hooked.logs})")
    document = json.loads(call["body"])
    assert document["status"] == "completed" and document["result"] == 4950
    signature = call["headers"][SIGNATURE_HEADER]
    assert verify_signature(secret, signature, call["body"])
    assert not verify_signature(GLOBAL_SECRET, signature, call["body"])
    wait_for(lambda: deliveries(hooked, api_key, task_id)[0]["state"] == "delivered", 10, "the delivery to be recorded")
    (delivery,) = deliveries(hooked, api_key, task_id)
    assert delivery["task_status"] == "completed" and delivery["attempts"] == 1
    assert [attempt["response_status"] for attempt in delivery["attempt_log"]] == [200]


def test_failed_calls_are_retried_with_every_attempt_recorded(hooked, receiver, key, conn):
    api_key, _ = key
    created = submit(hooked, api_key, {"operation": "fail", "max_attempts": 1, "callback_url": f"{receiver.base_url}/flaky/2"})
    task_id = created.json()["task_id"]

    def delivered():
        rows = deliveries(hooked, api_key, task_id)
        return rows if rows and rows[0]["state"] == "delivered" else None

    (delivery,) = wait_for(delivered, 20, f"the callback of {task_id} to get through (logs in {hooked.logs})")
    assert delivery["task_status"] == "failed"
    assert [attempt["response_status"] for attempt in delivery["attempt_log"]] == [500, 500, 200]
    sql_attempts = conn.execute(
        "SELECT a.response_status FROM asyncproc_callback_attempts a JOIN asyncproc_callbacks c ON c.id = a.callback_id "
        "WHERE c.task_id = %s ORDER BY a.id",
        (task_id,),
    ).fetchall()
    assert [row["response_status"] for row in sql_attempts] == [500, 500, 200]
    assert len(receiver.calls_to("/flaky/2")) == 3


def test_a_receiver_that_keeps_failing_is_given_up_after_the_max_age(hooked, receiver, key):
    api_key, _ = key
    created = submit(hooked, api_key, {"data": {"n": 1}, "callback_url": f"{receiver.base_url}/down"})
    task_id = created.json()["task_id"]

    def given_up():
        rows = deliveries(hooked, api_key, task_id)
        return rows if rows and rows[0]["state"] == "failed" else None

    (delivery,) = wait_for(given_up, MAX_AGE_SECONDS + 15, "the delivery to be given up")
    assert "gave up" in delivery["last_error"] and delivery["attempts"] >= 3
    assert all(attempt["response_status"] == 500 for attempt in delivery["attempt_log"])


def test_batch_items_take_callbacks_and_a_cancel_is_reported_too(hooked, receiver, key):
    api_key, secret = key
    hook = f"{receiver.base_url}/ok"
    response = requests.post(
        f"{hooked.base_url}/process/batch",
        json={"tasks": [{"data": {"n": 7}, "callback_url": hook}, {"operation": "sleep", "data": {"seconds": 60}, "delay_seconds": 60, "callback_url": hook}]},
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=10,
    )
    assert response.status_code == 202, response.text
    quick, slow = (item["task_id"] for item in response.json()["tasks"])
    cancelled = requests.post(f"{hooked.base_url}/results/{slow}/cancel", headers={"Authorization": f"Bearer {api_key}"}, timeout=10)
    assert cancelled.status_code == 200

    def both():
        found = {}
        for call in receiver.calls_to("/ok"):
            document = json.loads(call["body"])
            if document["task_id"] in (quick, slow) and verify_signature(secret, call["headers"][SIGNATURE_HEADER], call["body"]):
                found[document["task_id"]] = document["status"]
        return found if len(found) == 2 else None

    assert wait_for(both, 20, "both batch callbacks") == {quick: "completed", slow: "cancelled"}


@pytest.mark.parametrize(
    "url", ["http://10.0.0.1/hook", "http://example.com/hook", "http://127.0.0.2/hook", "file:///etc/passwd", 7]
)
def test_callback_urls_outside_the_allow_list_are_refused_at_submit(hooked, key, url):
    response = submit(hooked, key[0], {"data": {"n": 1}, "callback_url": url})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"] == [{"field": "callback_url"}]


def test_a_psql_task_is_signed_with_the_global_secret_and_a_refused_host_is_not_retried(hooked, receiver, conn):
    conn.execute("INSERT INTO tasks (operation, payload, callback_url) VALUES ('compute', '{\"n\": 3}', %s)", (f"{receiver.base_url}/ok",))
    # Inserted with psql, so never checked by the API: localhost is no listed host.
    refused_id = conn.execute(
        "INSERT INTO tasks (operation, payload, callback_url) VALUES ('compute', '{\"n\": 3}', 'http://localhost:1/x') RETURNING task_id"
    ).fetchone()["task_id"]

    def unsigned_by_key():
        return [call for call in receiver.calls_to("/ok") if json.loads(call["body"])["result"] == 3]

    (call,) = wait_for(unsigned_by_key, 20, "the psql task's callback")
    assert verify_signature(GLOBAL_SECRET, call["headers"][SIGNATURE_HEADER], call["body"])

    def refused():
        row = conn.execute("SELECT state, attempts, last_error FROM asyncproc_callbacks WHERE task_id = %s", (refused_id,)).fetchone()
        return row if row and row["state"] == "failed" else None

    row = wait_for(refused, 20, "the refused delivery")
    assert row["attempts"] == 1 and row["last_error"].startswith("refused:")


def test_keys_create_prints_the_keys_webhook_secret(database_url, conn):
    name = f"cli-hooks-{uuid.uuid4().hex[:8]}"
    created = subprocess.run(
        [sys.executable, "-m", "asyncproc.cli", "keys", "create", name],
        env=bare_env(DATABASE_URL=database_url),
        capture_output=True,
        text=True,
    )
    assert created.returncode == 0, created.stderr
    secret = conn.execute("SELECT callback_secret FROM api_keys WHERE name = %s", (name,)).fetchone()["callback_secret"]
    assert len(secret) == 64 and f"its webhook signing secret: {secret}" in created.stderr
    assert secret not in created.stdout
