"""asyncproc.client.Client against the real API and worker processes."""

from __future__ import annotations

import socket
import threading
from typing import Iterator

import pytest

from asyncproc import client as client_module
from asyncproc.client import (
    Client,
    InvalidRequest,
    InvalidTransition,
    ResultTimeout,
    TaskCancelled,
    TaskFailed,
    TaskNotFound,
)
from tests.conftest import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def client(service) -> Iterator[Client]:
    with Client(service.base_url, retries=2, backoff=0.05) as made:
        yield made


def test_submit_waits_for_the_result_through_wait(client):
    handle = client.submit("compute", n=1000)
    assert handle.result(timeout=20) == 499500
    document = handle.get()
    assert document["status"] == "completed" and document["operation"] == "compute"


def test_a_failed_task_raises_task_failed_and_retry_runs_it_again(client):
    handle = client.submit("fail", times=1, message="first run fails", max_attempts=1)
    with pytest.raises(TaskFailed) as failed:
        handle.result(timeout=20)
    assert failed.value.task_id == handle.task_id
    assert "first run fails" in failed.value.error_message
    assert handle.retry()["status"] == "pending"
    assert handle.result(timeout=20) == {"succeeded_on_attempt": 2}


def test_a_cancelled_task_raises_task_cancelled(client):
    handle = client.submit("sleep", seconds=30)
    assert handle.cancel()["status"] == "cancelled"
    with pytest.raises(TaskCancelled):
        handle.result(timeout=10)
    with pytest.raises(InvalidTransition) as refused:
        handle.cancel()
    assert refused.value.status == 409


def test_result_times_out_with_the_last_document(client):
    handle = client.submit("compute", n=1, delay_seconds=3600)
    with pytest.raises(ResultTimeout) as timed_out:
        handle.result(timeout=0.3)
    assert timed_out.value.document["status"] == "pending"
    handle.cancel()


def test_events_iterate_the_stream_until_the_task_is_finished(client):
    handle = client.submit("steps", count=3, seconds=0.2)
    documents = list(handle.events())
    assert documents[-1]["status"] == "completed"
    assert documents[-1]["result"] == {"steps": 3}
    assert any(document["progress"] not in (None, 100) for document in documents), documents


def test_submit_batch_returns_handles_in_order(client):
    handles = client.submit_batch(
        [{"operation": "compute", "data": {"n": n}} for n in (10, 20, 30)]
    )
    assert [handle.result(timeout=20) for handle in handles] == [45, 190, 435]


def test_input_named_like_an_option_goes_through_data(client):
    handle = client.submit("async_echo", data={"priority": "high"}, priority=5, note="x")
    assert handle.result(timeout=20) == {"priority": "high", "note": "x"}


def test_api_errors_are_typed_exceptions(client):
    with pytest.raises(InvalidRequest) as invalid:
        client.submit("no_such_operation")
    assert invalid.value.status == 422 and invalid.value.code == "invalid_request"
    with pytest.raises(TaskNotFound):
        client.task("00000000-0000-0000-0000-000000000000").get()


class DropFirstAnswer:
    """A TCP proxy to the API that forwards the first request but never returns
    its answer: the API stored the task, and the client sees a dropped connection."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            drop = self.connections == 1
            threading.Thread(target=self._pump, args=(downstream, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, downstream, drop), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket, drop: bool) -> None:
        try:
            while data := source.recv(65536):
                if drop:
                    break
                target.sendall(data)
        except OSError:
            pass
        for end in (source, target):
            end.close()

    def close(self) -> None:
        self.listener.close()


def test_a_retried_submit_reuses_its_idempotency_key(service, conn):
    proxy = DropFirstAnswer(int(service.base_url.rsplit(":", 1)[1]))
    try:
        with Client(f"http://127.0.0.1:{proxy.port}", retries=2, backoff=0.05) as through_proxy:
            handle = through_proxy.submit("shout", text="once")
        assert proxy.connections == 2, "the first answer was not dropped, so nothing was retried"
    finally:
        proxy.close()
    rows = conn.execute(
        "SELECT task_id::text AS task_id, idempotency_key FROM tasks WHERE payload = %s::jsonb",
        ('{"text": "once"}',),
    ).fetchall()
    assert [row["task_id"] for row in rows] == [handle.task_id]
    assert rows[0]["idempotency_key"]
    wait_for(lambda: service.get(handle.task_id).json()["status"] == "completed", 20, "the task to complete")


def test_every_api_error_code_has_a_client_exception():
    from asyncproc import errors
    from asyncproc.api.validation import MAX_WAIT_SECONDS
    from asyncproc.waiting import KEEPALIVE_SECONDS as SSE_KEEPALIVE_SECONDS
    from asyncproc.ledger import FINAL_STATUSES

    def codes(cls):
        for sub in cls.__subclasses__():
            yield sub.code
            yield from codes(sub)

    server_codes = {errors.AsyncprocError.code, *codes(errors.AsyncprocError), *errors.HTTP_CODES.values()}
    assert server_codes == set(client_module.ERRORS)
    assert (client_module.MAX_WAIT_SECONDS, client_module.SSE_KEEPALIVE_SECONDS) == (
        MAX_WAIT_SECONDS,
        SSE_KEEPALIVE_SECONDS,
    )
    assert client_module.FINAL_STATUSES == FINAL_STATUSES
