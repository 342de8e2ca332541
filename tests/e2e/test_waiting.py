"""Waiting and slow clients against the real `asyncproc api`: none of them holds a thread."""

from __future__ import annotations

import json
import socket
import time
from typing import Iterator

import pytest
import requests

from tests.conftest import wait_for
from tests.e2e.conftest import Service, start_service, stop_service

pytestmark = pytest.mark.e2e

WAITERS = 200
# start_service runs the API with two gunicorn processes.
API_PROCESSES = 2


@pytest.fixture(scope="module")
def api(tmp_path_factory, database_url, redis_url) -> Iterator[Service]:
    running, processes = start_service(
        tmp_path_factory.mktemp("waiting"),
        database_url,
        redis_url,
        extra_env={
            "ASYNCPROC_HEADER_TIMEOUT_SECONDS": "1",
            "ASYNCPROC_BODY_TIMEOUT_SECONDS": "1",
            "ASYNCPROC_STREAM_MAX_SECONDS": "1",
            "ASYNCPROC_MAX_WAITERS_PER_KEY": str(WAITERS + 10),
            "ASYNCPROC_MAX_CONNECTIONS_PER_ADDRESS": "5",
            "ASYNCPROC_MAX_BODY_BYTES": "4096",
        },
    )
    yield running
    assert stop_service(processes) == [0, 0], f"a process did not exit cleanly; logs in {running.logs}"


def _connect(service: Service, source: str = "127.0.0.1") -> socket.socket:
    host, port = service.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10, source_address=(source, 0))
    return sock


def _raw(service: Service, data: bytes, source: str = "127.0.0.1") -> tuple[int, dict, bytes]:
    """Send raw bytes; (status, headers, body) of the answer, read until the server closes."""
    with _connect(service, source) as sock:
        sock.sendall(data)
        answer = _read_all(sock)
    return _parse(answer)


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(answer: bytes) -> tuple[int, dict, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    return int(lines[0].split()[1]), headers, body


def _dechunk(data: bytes) -> bytes:
    out = []
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out.append(data[:size])
        data = data[size + 2 :]
    return b"".join(out)


def _timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def test_hundreds_of_long_polls_leave_the_api_free_and_all_wake_on_the_change(api):
    task_id = api.submit({"data": {"operation": "sleep", "seconds": 1}, "delay_seconds": 3600})
    request = f"GET /results/{task_id}?wait=30 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    # Each waiter from a loopback address of its own, below the cap per address.
    waiters = []
    try:
        for index in range(1, WAITERS + 1):
            waiters.append(_connect(api, f"127.0.1.{index}"))
            waiters[-1].sendall(request)
        # Every waiter is parked: the API still answers at once (16 threads would all be taken).
        assert _timed(lambda: api.health().raise_for_status()) < 2
        posted = api.post({"data": {"operation": "sleep", "seconds": 0}})
        assert posted.status_code == 202
        cancelled = requests.post(f"{api.base_url}/results/{task_id}/cancel", timeout=10)
        assert cancelled.status_code == 200, cancelled.text
        for sock in waiters:
            status, _, body = _parse(_read_all(sock))
            assert status == 200
            assert json.loads(body)["status"] == "cancelled"
    finally:
        for sock in waiters:
            sock.close()


def test_a_key_beyond_its_waiters_gets_429_with_retry_after(tmp_path, database_url, redis_url):
    service, processes = start_service(
        tmp_path, database_url, redis_url, extra_env={"ASYNCPROC_MAX_WAITERS_PER_KEY": "1"}
    )
    try:
        task_id = service.submit({"data": {"operation": "sleep", "seconds": 1}, "delay_seconds": 3600})
        request = f"GET /results/{task_id}?wait=30 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        waiting: list[socket.socket] = []
        try:
            # Caps are per API process, and connections go to whichever process is free:
            # each waiter parks, until one lands on a process where the key already waits.
            for _ in range(API_PROCESSES + 1):
                sock = _connect(service)
                waiting.append(sock)
                sock.sendall(request)
                sock.settimeout(1)
                try:
                    answer = _read_all(sock)
                except TimeoutError:
                    continue
                break
            else:
                pytest.fail(f"no waiter was refused among {len(waiting)} (logs in {service.logs})")
        finally:
            for sock in waiting:
                sock.close()
        status, headers, body = _parse(answer)
        assert status == 429, body
        assert json.loads(body)["error"]["code"] == "too_many_waiters"
        assert int(headers["retry-after"]) >= 1
    finally:
        stop_service(processes)


def test_slow_headers_are_cut_off_with_a_json_408_and_hold_nothing(api):
    slow = [_connect(api, "127.0.0.4") for _ in range(4)]
    for sock in slow:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    assert _timed(lambda: api.health().raise_for_status()) < 1
    for sock in slow:
        with sock:
            status, headers, body = _parse(_read_all(sock))
        assert status == 408
        assert headers["content-type"] == "application/json"
        assert json.loads(body)["error"]["code"] == "request_timeout"


def test_a_body_that_stops_coming_gets_408(api):
    with _connect(api) as sock:
        sock.sendall(b"POST /process HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        status, _, body = _parse(_read_all(sock))
    assert status == 408
    assert json.loads(body)["error"]["code"] == "request_timeout"


def test_connections_beyond_the_cap_per_address_are_refused(api):
    held = [_connect(api, "127.0.0.5") for _ in range(12)]
    try:
        # Over the cap: a 429 at once. Within it: the header timeout's 408 later.
        answers = [_parse(_read_all(sock)) for sock in held]
    finally:
        for sock in held:
            sock.close()
    refused = [json.loads(body)["error"]["code"] for status, _, body in answers if status == 429]
    # Two processes with 5 each: at least two of 12 connections go over a cap.
    assert len(refused) >= 2
    assert set(refused) == {"too_many_connections"}
    assert {status for status, _, _ in answers} <= {408, 429}
    assert api.health().status_code == 200


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431, "headers_too_large"),
        (b"NOT HTTP AT ALL\r\n\r\n", 400, "bad_request"),
    ],
)
def test_errors_before_the_app_are_json_with_a_code(api, raw, status, code):
    got, headers, body = _raw(api, raw)
    assert got == status
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == code


def test_a_chunked_body_over_the_limit_is_413(api):
    chunk = b'{"data": {"pad": "' + b"a" * 3000 + b'"}}'
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(3)) + b"0\r\n\r\n"
    status, _, answer = _raw(
        api,
        b"POST /process HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n" + body,
    )
    assert status == 413
    assert json.loads(answer)["error"]["code"] == "body_too_large"


def test_an_event_stream_ends_at_its_maximum_length_and_resumes_without_repeats(api):
    task_id = api.submit({"data": {"operation": "sleep", "seconds": 1}, "delay_seconds": 3600})
    url = f"{api.base_url}/results/{task_id}/events"
    first = requests.get(url, timeout=10).text
    events = [block for block in first.split("\n\n") if block.startswith("id: ")]
    assert len(events) == 1
    assert first.rstrip().endswith("retry: 1000")
    last_id = events[0].split("\n")[0].removeprefix("id: ")

    resumed = requests.get(url, headers={"Last-Event-ID": last_id}, timeout=10).text
    # Nothing changed since that event: the resumed stream does not send it again.
    assert "event: task" not in resumed
    assert resumed.rstrip().endswith("retry: 1000")


def test_a_stopping_api_answers_its_waiting_clients_and_exits_promptly(tmp_path, database_url, redis_url):
    service, processes = start_service(tmp_path, database_url, redis_url)
    api_process = processes[0]
    try:
        task_id = service.submit({"data": {"operation": "sleep", "seconds": 1}, "delay_seconds": 3600})
        waiters = [_connect(service, f"127.0.2.{index}") for index in range(1, 6)]
        for sock in waiters:
            sock.sendall(f"GET /results/{task_id}?wait=60 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        stream = _connect(service, "127.0.2.99")
        stream.sendall(f"GET /results/{task_id}/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert b"event: task" in stream.recv(65536)
        started = time.monotonic()
        api_process.terminate()
        for sock in waiters:
            with sock:
                status, _, body = _parse(_read_all(sock))
            assert (status, json.loads(body)["status"]) == (200, "pending")
        with stream:
            assert b"retry: " in _read_all(stream)
        assert api_process.wait(10) == 0
        # Well within gunicorn's graceful timeout (10 s), which parked clients would otherwise take.
        assert time.monotonic() - started < 5
    finally:
        stop_service(processes)


def test_a_declared_length_over_the_limit_is_413_before_the_body_is_sent(api):
    with _connect(api) as sock:
        sock.sendall(b"POST /process HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 999999\r\n\r\n")
        status, _, body = _parse(_read_all(sock))
    assert status == 413
    assert json.loads(body)["error"]["code"] == "body_too_large"
