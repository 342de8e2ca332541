"""A cancelled run stays fenced: no second attempt beside it, and no start after the cancel is known.

Real worker (and API) processes over the session's PostgreSQL; the handlers are
tests/e2e/fencing_ops.py's journal_run, whose journal shows each run's
[first line, last line] from the outside.
"""

from __future__ import annotations

import asyncio
import json
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest
import requests
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.conftest import wait_for
from tests.e2e.conftest import Service, _start, service_env, start_service, stop_processes, stop_service
from tests.e2e.fencing_ops import JOURNAL_ENV, read_journal, runs

pytestmark = pytest.mark.e2e


@pytest.fixture
def journal(tmp_path) -> Path:
    return tmp_path / "journal.jsonl"


@pytest.fixture
def service(tmp_path, database_url, journal) -> Iterator[Service]:
    """The API and one worker (concurrency 4); only for the test that asks, so that no other worker takes its tasks."""
    extra = {"ASYNCPROC_OPERATIONS_MODULE": "tests.e2e.fencing_ops", JOURNAL_ENV: str(journal)}
    running, processes = start_service(tmp_path, database_url, None, concurrency=4, extra_env=extra)
    yield running
    assert stop_service(processes) == [0, 0], f"a process did not exit cleanly; logs in {running.logs}"


def _started(journal: Path, task_id: str, attempt: int) -> bool:
    return any(line["task_id"] == task_id and line["attempt"] == attempt and line["event"] == "start"
               for line in read_journal(journal))


def _ended(journal: Path, task_id: str, attempt: int) -> bool:
    return any(line["task_id"] == task_id and line["attempt"] == attempt and line["event"] == "end"
               for line in read_journal(journal))


def test_a_retry_right_after_a_cancel_waits_for_the_cancelled_thread(service, journal):
    """Defect 3: a cancel ended a thread handler's job at once while its thread ran on (a thread cannot be
    killed); a retry then found no earlier job running and started beside it."""
    task_id = service.submit({"operation": "fence_thread",
                              "data": {"seconds": 3, "retry_seconds": 0.2, "honour_stop": False}})
    wait_for(lambda: _started(journal, task_id, 1), 10, "the first attempt to start", interval=0.01)
    cancel = requests.post(f"{service.base_url}/results/{task_id}/cancel", timeout=10)
    assert (cancel.status_code, cancel.json()["status"]) == (200, "cancelled"), cancel.text
    retry = requests.post(f"{service.base_url}/results/{task_id}/retry", timeout=10)
    assert retry.status_code == 202, retry.text

    body = service.wait_finished(task_id, timeout=15)
    assert (body["status"], body["attempts"]) == ("completed", 2), body
    wait_for(lambda: _ended(journal, task_id, 1), 10, "the first attempt's thread to return", interval=0.05)
    attempts = runs(read_journal(journal), task_id)
    assert sorted(attempts) == [1, 2], attempts
    first_start, first_end, _ = attempts[1]
    second_start, second_end, _ = attempts[2]
    assert second_start >= first_end, (
        f"attempt 2 ran from +{second_start - first_start:.2f}s to +{second_end - first_start:.2f}s, while attempt 1's"
        f" thread, cancelled, ran until +{first_end - first_start:.2f}s: the two overlapped by"
        f" {min(first_end, second_end) - second_start:.2f}s (logs in {service.logs})"
    )


# -- a cancel that lands between the fetch and the start ---------------------------------------------------------

POLL_TEXT = b"abort_requested = true"  # Procrastinate's list_jobs_to_abort, its 5 s poll for aborts


@dataclass
class _Connection:
    client: asyncio.StreamWriter
    worker_port: int
    holding: bool = False
    held: bytearray = field(default_factory=bytearray)
    poll_names: set = field(default_factory=set)
    poll_started: float | None = None


class HoldingProxy:
    """A loopback proxy in front of PostgreSQL that reads the protocol as it goes by.

    It holds back, on demand, the first result row that names a given task (the
    worker's fetch of its job: the server has run and committed the fetch, the
    worker has not seen it yet), until release(). It notes the abort
    notifications it passes on and each of Procrastinate's abort polls.
    Connections must not use TLS (sslmode=disable).
    """

    def __init__(self, target: dict):
        self._target = (target.get("host") or "127.0.0.1", int(target.get("port") or 5432))
        self.port = 0
        self.held = threading.Event()
        self.held_connection: _Connection | None = None
        self.abort_notices: list[tuple[float, int, int]] = []  # (time passed on, job id, worker's port)
        self.polls: list[tuple[float, float]] = []  # (request seen, answer passed on)
        self._armed: bytes | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="holding-proxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._connections: list[_Connection] = []
        self._server_writers: list[asyncio.StreamWriter] = []

    def start(self) -> "HoldingProxy":
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", 0), self._loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()
            # Closing both ends ends every pump with an IncompleteReadError, which _accept expects.
            for connection in self._connections:
                connection.client.close()
            for writer in self._server_writers:
                writer.close()
            pumps = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            if pumps:
                await asyncio.wait(pumps, timeout=5)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def arm(self, task_id: str) -> None:
        self._armed = task_id.encode()

    def release(self) -> None:
        """Pass on what was held, and everything after it; returns once it is written."""
        async def release() -> None:
            connection = self.held_connection
            connection.holding = False
            connection.client.write(bytes(connection.held))
            connection.held.clear()

        asyncio.run_coroutine_threadsafe(release(), self._loop).result(10)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        connection = _Connection(client_writer, client_writer.get_extra_info("peername")[1])
        self._connections.append(connection)
        server_reader, server_writer = await asyncio.open_connection(*self._target)
        self._server_writers.append(server_writer)
        try:
            await asyncio.gather(
                self._from_worker(client_reader, server_writer, connection),
                self._from_server(server_reader, client_writer, connection),
            )
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass  # one end went away: so does the other
        finally:
            server_writer.close()
            client_writer.close()

    async def _from_worker(self, reader, writer, connection: _Connection) -> None:
        # The first message (startup, or a cancel request) has no type byte.
        size = struct.unpack("!I", await reader.readexactly(4))[0]
        writer.write(struct.pack("!I", size) + await reader.readexactly(size - 4))
        while True:
            kind = await reader.readexactly(1)
            size = struct.unpack("!I", await reader.readexactly(4))[0]
            body = await reader.readexactly(size - 4)
            if kind == b"P":
                name, _, rest = body.partition(b"\0")
                if POLL_TEXT in rest.partition(b"\0")[0]:
                    connection.poll_started = time.time()
                    if name:
                        connection.poll_names.add(name)
            elif kind == b"B" and body.split(b"\0")[1] in connection.poll_names:
                connection.poll_started = time.time()
            writer.write(kind + struct.pack("!I", size) + body)

    async def _from_server(self, reader, writer, connection: _Connection) -> None:
        while True:
            kind = await reader.readexactly(1)
            size = struct.unpack("!I", await reader.readexactly(4))[0]
            message = kind + struct.pack("!I", size) + await reader.readexactly(size - 4)
            if connection.holding:
                connection.held += message
                continue
            if kind == b"D" and self._armed is not None and self._armed in message:
                self._armed = None
                connection.holding = True
                connection.held += message
                self.held_connection = connection
                self.held.set()
                continue
            writer.write(message)
            if kind == b"A" and b"abort_job_requested" in message:
                # After the type and length: the sender's pid, then the channel and the payload.
                payload = message[9:].split(b"\0")[1]
                self.abort_notices.append((time.time(), json.loads(payload)["job_id"], connection.worker_port))
            elif kind == b"Z" and connection.poll_started is not None:
                self.polls.append((connection.poll_started, time.time()))
                connection.poll_started = None

    def unread_by_worker(self, worker_port: int) -> int | None:
        """Bytes passed on to the worker on that connection that it has not read yet (its socket's receive queue)."""
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.split(":")[1], 16) == worker_port and int(remote.split(":")[1], 16) == self.port:
                return int(fields[4].split(":")[1], 16)
        return None


@pytest.fixture
def proxied_worker(tmp_path, database_url, clean_db) -> Iterator[tuple[HoldingProxy, Path, Path]]:
    """A worker (concurrency 2) whose every database connection goes through a HoldingProxy."""
    proxy = HoldingProxy(conninfo_to_dict(database_url)).start()
    journal = tmp_path / "journal.jsonl"
    proxied = make_conninfo(database_url, host="127.0.0.1", port=proxy.port, sslmode="disable", gssencmode="disable")
    env = service_env(proxied, None, {"ASYNCPROC_OPERATIONS_MODULE": "tests.e2e.fencing_ops", JOURNAL_ENV: str(journal)})
    worker = _start(["worker", "--concurrency", "2"], env, tmp_path / "worker.log")
    try:
        yield proxy, journal, tmp_path
    finally:
        if proxy.held_connection is not None and proxy.held_connection.holding:
            proxy.release()
        clean_db.execute("UPDATE tasks SET status = 'cancelled' WHERE status IN ('pending', 'running')")
        stop_processes([worker])
        proxy.stop()
    assert worker.returncode == 0, f"the worker did not exit cleanly; log in {tmp_path}"


def _doing_jobs(conn, task_id: str) -> list[int]:
    return [row["id"] for row in conn.execute(
        "SELECT id FROM procrastinate_jobs WHERE args->>'task_id' = %s AND status = 'doing'", (task_id,)
    )]


def test_a_cancel_between_the_fetch_and_the_start_stops_the_handler_within_a_second(proxied_worker, clean_db):
    """Defect 5: an abort notification for a job the worker has fetched but not yet registered is dropped by
    Procrastinate (it only aborts the jobs it runs), so the cancelled task's handler started anyway and ran until
    Procrastinate's next abort poll, up to 5 s later.

    Made certain with the proxy: the fetch's answer is held back, the task is cancelled and the worker has read
    the abort notification, and the answer is let through right after one of Procrastinate's abort polls (the
    worker's only other way to learn of the cancel), so that the next poll is 5 s away.
    """
    proxy, journal, logs = proxied_worker
    conn = clean_db
    # Another task keeps running throughout, as in any busy worker: Procrastinate polls for aborts only then.
    anchor = conn.execute(
        "INSERT INTO tasks (operation, payload) VALUES ('fence_process', '{\"seconds\": 60}') RETURNING task_id::text"
    ).fetchone()["task_id"]
    wait_for(lambda: _started(journal, anchor, 1), 30, f"the worker to start a task (log in {logs})", interval=0.05)

    task_id = str(uuid.uuid4())
    proxy.arm(task_id)
    conn.execute("INSERT INTO tasks (task_id, operation, payload) VALUES (%s, 'fence_process', '{\"seconds\": 10}')",
                 (task_id,))
    assert proxy.held.wait(10), f"the worker never fetched the task (log in {logs})"
    wait_for(lambda: conn.execute("SELECT status FROM tasks WHERE task_id = %s", (task_id,)).fetchone()["status"]
             == "running", 5, "the fetch's claim to be committed")
    (job_id,) = _doing_jobs(conn, task_id)

    cancelled_at = time.time()
    assert conn.execute("SELECT status FROM asyncproc_cancel(%s)", (task_id,)).fetchone()["status"] == "cancelled"
    notice = wait_for(lambda: next((n for n in proxy.abort_notices if n[1] == job_id), None), 5,
                      "the abort notification to reach the worker")
    wait_for(lambda: proxy.unread_by_worker(notice[2]) == 0, 5, "the worker to read the abort notification",
             interval=0.005)
    # Procrastinate's abort poll: let the fetch's answer through right after one, if it polls at all.
    polls_before = len(proxy.polls)
    try:
        wait_for(lambda: len(proxy.polls) > polls_before and proxy.polls[-1][0] > notice[0], 6,
                 "an abort poll", interval=0.005)
    except TimeoutError:
        pass  # a worker that does not poll for aborts every 5 s: nothing to line up with
    proxy.release()
    released_at = time.time()

    wait_for(lambda: not _doing_jobs(conn, task_id), 15, f"the cancelled task's job to end (log in {logs})",
             interval=0.02)
    lines = runs(read_journal(journal), task_id)
    assert set(lines) <= {1}, lines
    if lines:
        first, last, _ = lines[1]
        assert last <= released_at + 1.0, (
            f"the cancelled task's handler started {first - released_at:.2f}s after the worker received its job"
            f" ({released_at - cancelled_at:.2f}s after the cancel) and ran until {last - released_at:.2f}s after"
            f" it: the cancel was not seen until Procrastinate's abort poll (log in {logs})"
        )
