"""What a hostile receiver or callback_url can cost a real worker: time, memory, other deliveries, addresses.

The receivers listen on 127.0.0.2, the one network ASYNCPROC_CALLBACK_ALLOW lists next to `*`, so that every
other address goes through the "is it public?" check.
"""

from __future__ import annotations

import gzip
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from tests.e2e.conftest import Service, start_service, stop_service
from tests.support import wait_for

pytestmark = pytest.mark.e2e

TIMEOUT_SECONDS = 6
DRIP_INTERVAL_SECONDS = 0.5
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
BOMB_DECODED_BYTES = 300 << 20
NOT_PUBLIC = [
    "::127.0.0.1",  # IPv4-compatible
    "::ffff:0:7f00:1",  # IPv4-translated (SIIT)
    "64:ff9b::a9fe:a9fe",  # NAT64 to 169.254.169.254
    "64:ff9b:1::a9fe:a9fe",  # local-use NAT64
    "2002:a9fe:a9fe::",  # 6to4 of 169.254.169.254
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
    "fec0::1",  # site-local
]


def gzip_bomb(decoded_bytes: int) -> bytes:
    """A gzip stream of `decoded_bytes` zeros: one member of a MiB, repeated (a decoder reads every member)."""
    return gzip.compress(bytes(1 << 20), compresslevel=9) * (decoded_bytes >> 20)


class Receiver:
    """/ok answers at once, /drip a byte every DRIP_INTERVAL_SECONDS, /hold once released, /bomb a gzip bomb."""

    def __init__(self) -> None:
        self.arrived: dict[str, threading.Event] = {path: threading.Event() for path in ("/ok", "/drip", "/hold", "/bomb")}
        self.release = threading.Event()
        self.stop = threading.Event()
        bomb = gzip_bomb(BOMB_DECODED_BYTES)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                receiver.arrived[self.path].set()
                try:
                    if self.path == "/drip":
                        for byte in ANSWER:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            if receiver.stop.wait(DRIP_INTERVAL_SECONDS):
                                return
                        return
                    if self.path == "/hold":
                        receiver.release.wait(60)
                    if self.path == "/bomb":
                        self.wfile.write(
                            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Type: application/json\r\n"
                            + f"Content-Length: {len(bomb)}\r\nConnection: close\r\n\r\n".encode()
                            + bomb
                        )
                        return
                    self.wfile.write(ANSWER)
                except OSError:
                    pass  # the deliverer hung up: that is what is tested
                finally:
                    self.close_connection = True

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.2", 0), Handler)
        self.base_url = f"http://127.0.0.2:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    made = Receiver()
    yield made
    made.stop.set()
    made.release.set()
    made.server.shutdown()


@pytest.fixture(scope="module")
def deliverer(tmp_path_factory, database_url) -> Iterator[tuple[Service, int]]:
    """The API and one worker; the worker's pid."""
    logs = tmp_path_factory.mktemp("webhook-limits")
    env = {
        "ASYNCPROC_CALLBACK_ALLOW": "127.0.0.2,*",
        "ASYNCPROC_CALLBACK_SECRET": "webhook-limits-secret-of-the-e2e-tests",
        "ASYNCPROC_CALLBACK_TIMEOUT_SECONDS": str(TIMEOUT_SECONDS),
        # A failed attempt is not retried while a test looks at it.
        "ASYNCPROC_CALLBACK_BACKOFF_SECONDS": "600",
        "ASYNCPROC_CALLBACK_POLL_SECONDS": "0.05",
    }
    running, processes = start_service(logs, database_url, None, extra_env=env)
    yield running, processes[1].pid
    assert stop_service(processes) == [0, 0], f"a process did not exit cleanly; logs in {running.logs}"


def deliveries(conn, task_id: str) -> list[dict]:
    return conn.execute(
        "SELECT c.state, c.attempts, c.last_error, a.response_status, a.error, a.duration_ms "
        "FROM asyncproc_callbacks c LEFT JOIN asyncproc_callback_attempts a ON a.callback_id = c.id "
        "WHERE c.task_id = %s ORDER BY a.id",
        (task_id,),
    ).fetchall()


def attempted(conn, task_id: str, what: str) -> dict:
    return wait_for(lambda: [row for row in deliveries(conn, task_id) if row["duration_ms"] is not None], 30, what)[0]


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def test_a_receiver_that_drips_its_answer_is_cut_off_at_the_timeout(deliverer, receiver, conn):
    service, _ = deliverer
    task_id = service.submit({"data": {"n": 1}, "callback_url": f"{receiver.base_url}/drip"})
    # The whole answer would take len(ANSWER) * DRIP_INTERVAL_SECONDS = 28 s, each byte well within the timeout.
    attempt = attempted(conn, task_id, f"the dripping delivery to end (logs in {service.logs})")
    assert attempt["state"] == "pending" and attempt["response_status"] is None
    assert "timed out" in attempt["error"]
    assert TIMEOUT_SECONDS * 1000 <= attempt["duration_ms"] < (TIMEOUT_SECONDS + 2) * 1000


def test_a_gzip_bomb_answer_is_neither_read_nor_decoded(deliverer, receiver, conn):
    service, worker_pid = deliverer
    before = peak_rss_kib(worker_pid)
    task_id = service.submit({"data": {"n": 1}, "callback_url": f"{receiver.base_url}/bomb"})
    attempt = attempted(conn, task_id, f"the bomb's delivery to be recorded (logs in {service.logs})")
    assert attempt["state"] == "delivered" and attempt["response_status"] == 200
    grown_mib = (peak_rss_kib(worker_pid) - before) / 1024
    assert grown_mib < 32, f"the worker's peak memory grew {grown_mib:.0f} MiB on a {BOMB_DECODED_BYTES >> 20} MiB bomb"


def test_a_slow_receiver_does_not_hold_back_another_delivery(deliverer, receiver, conn):
    service, _ = deliverer
    slow = service.submit({"data": {"n": 1}, "callback_url": f"{receiver.base_url}/hold"})
    assert receiver.arrived["/hold"].wait(30), f"the slow receiver was never called (logs in {service.logs})"
    fast = service.submit({"data": {"n": 2}, "callback_url": f"{receiver.base_url}/ok"})
    assert receiver.arrived["/ok"].wait(30), f"the fast receiver was never called (logs in {service.logs})"
    # The slow call still hangs: the fast one did not wait for it to end.
    assert not receiver.release.is_set() and deliveries(conn, slow)[0]["duration_ms"] is None
    assert attempted(conn, fast, "the fast delivery to be recorded")["state"] == "delivered"
    receiver.release.set()


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_ipv6_forms_of_private_addresses_are_refused_at_submit(deliverer, address):
    service, _ = deliverer
    response = service.post({"data": {"n": 1}, "callback_url": f"http://[{address}]:8080/hook"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["details"] == [{"field": "callback_url"}] and "not public" in error["message"]


def test_refused_deliveries_store_no_address(deliverer, conn):
    service, _ = deliverer
    # Inserted with SQL, so never checked by the API. localhost resolves to 127.0.0.1, which is not listed.
    urls = [f"http://[{address}]:8080/hook" for address in NOT_PUBLIC] + ["http://localhost:8080/hook"]
    task_ids = [
        conn.execute(
            "INSERT INTO tasks (operation, payload, callback_url) VALUES ('compute', '{\"n\": 1}', %s) RETURNING task_id",
            (url,),
        ).fetchone()["task_id"]
        for url in urls
    ]

    def all_attempted():
        rows = [deliveries(conn, task_id) for task_id in task_ids]
        return rows if all(row and row[0]["duration_ms"] is not None for row in rows) else None

    for url, (row,) in zip(urls, wait_for(all_attempted, 30, f"every refused delivery (logs in {service.logs})")):
        assert (row["state"], row["attempts"], row["last_error"]) == ("failed", 1, "refused: not a public address"), url

