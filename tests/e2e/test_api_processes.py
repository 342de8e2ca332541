"""The API's gunicorn processes share the clients: a burst of keep-alive connections no longer lands on one
process while the other idles (asyncproc/api/asgi.py, Worker.run: one connection accepted per wake)."""

from __future__ import annotations

import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import psycopg
import pytest
import requests

from asyncproc.config import ApiSettings
from tests.conftest import wait_for
from tests.e2e.conftest import Service, start_service, stop_service
from tests.support import children

pytestmark = pytest.mark.e2e

CLIENTS = 16
ROUNDS = 8
SERVING = re.compile(r"\[(\d+)\] gunicorn\.error \[rid=-\] ASGI server listening on")


@pytest.fixture(scope="module")
def service(tmp_path_factory, database_url) -> Iterator[tuple[Service, list[subprocess.Popen]]]:
    running, processes = start_service(tmp_path_factory.mktemp("api-processes"), database_url, None, concurrency=1)
    yield running, processes
    assert stop_service(processes) == [0, 0], f"a process did not exit cleanly; logs in {running.logs}"


@pytest.fixture
def api(service) -> tuple[Service, int]:
    running, processes = service
    return running, processes[0].pid


def _nice(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[16])


def _children(pid: int) -> list[int]:
    return sorted(children(pid))


def _established_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                inodes.add(fields[9])
    return inodes


def _connections_per_process(workers: list[int], port: int) -> list[int]:
    inodes = _established_inodes(port)
    counts = []
    for pid in workers:
        held = {os.readlink(fd).removeprefix("socket:[").rstrip("]") for fd in Path(f"/proc/{pid}/fd").iterdir()
                if os.readlink(fd).startswith("socket:[")}
        counts.append(len(held & inodes))
    return counts


def _burst(port: int) -> list[socket.socket]:
    """CLIENTS keep-alive connections opened at once, each answered once, as a client pool opens them."""
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(CLIENTS)]
    for client in clients:
        client.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
    for client in clients:
        assert client.recv(65536).startswith(b"HTTP/1.1 200")
    return clients


def _serving_workers(service: Service) -> list[int]:
    log = (service.logs / "api.log").read_text(errors="replace")
    return sorted({int(pid) for pid in SERVING.findall(log)})


def test_a_burst_of_keep_alive_clients_is_shared_between_the_api_processes(api):
    service, arbiter = api
    port = int(service.base_url.rsplit(":", 1)[1])
    # /health answered once one process served; the burst needs both.
    workers = wait_for(lambda: len(_serving_workers(service)) == 2 and _serving_workers(service), 30,
                       f"both API processes to serve (logs in {service.logs})")
    assert workers == _children(arbiter)
    fewer = []
    for _ in range(ROUNDS):
        clients = _burst(port)
        counts = _connections_per_process(workers, port)
        assert sum(counts) == CLIENTS, counts
        fewer.append(min(counts))
        for client in clients:
            client.close()
    # Accepting as many as were waiting, the first process awake took all 16 nearly every time.
    assert statistics.mean(fewer) >= 2, fewer


def _api_connections(database_url: str) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name LIKE 'asyncproc-api%%'"
        ).fetchone()[0]


def test_the_api_opens_no_more_database_connections_than_the_deployment_guide_budgets(api, database_url):
    """docs/deployment.md: ASYNCPROC_API_WORKERS x (ASYNCPROC_API_THREADS + 2) per instance."""
    service, _ = api
    budget = 2 * (ApiSettings().threads + 2)
    stop = threading.Event()
    errors: list[str] = []

    def client() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                posted = session.post(f"{service.base_url}/process", json={"data": {"input": 1, "operation": "compute"}},
                                      timeout=10)
                if posted.status_code != 202:
                    errors.append(posted.text)
                    return
                session.get(f"{service.base_url}/results/{posted.json()['task_id']}?wait=0.2", timeout=10)
                session.get(f"{service.base_url}/health", timeout=10)

    clients = [threading.Thread(target=client) for _ in range(48)]
    for thread in clients:
        thread.start()
    try:
        most = 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            most = max(most, _api_connections(database_url))
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in clients:
            thread.join(30)
    assert not errors, errors[:3]
    # The load reached the pools: more than one connection per process, and never past the budget.
    assert 2 < most <= budget, (most, budget)


def test_the_listen_queue_keeps_its_configured_length(api):
    service, _ = api
    port = int(service.base_url.rsplit(":", 1)[1])
    listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True)
    # For a listening socket, ss shows the accept queue's length as Send-Q: gunicorn's default backlog.
    (line,) = listening.stdout.splitlines()
    assert int(line.split()[2]) == 2048, line


def test_the_api_yields_the_cpu_to_the_workers_of_its_host(service):
    # The kernel shares the cores equally between processes: at equal priority an API on the workers' host
    # accepts tasks faster than the workers finish them, and the backlog grows for as long as the load lasts
    # (docs/performance.md, figure 10).
    running, (api, worker) = service
    workers = wait_for(lambda: len(_children(api.pid)) == 2 and _children(api.pid), 30,
                       f"both API processes to start (logs in {running.logs})")
    assert [_nice(pid) for pid in (api.pid, *workers)] == [10, 10, 10]
    assert _nice(worker.pid) == os.getpriority(os.PRIO_PROCESS, 0)


@pytest.mark.parametrize("started_at, configured, expected", [(0, 10, 10), (15, 10, 15), (3, 0, 3)])
def test_the_api_only_ever_lowers_its_priority(started_at, configured, expected):
    # An API started under `nice -n 15` keeps it; raising a priority needs privileges an API should not use.
    probe = ("import os; from asyncproc.api.server import _yield_cpu_to_workers as y; "
             f"y({configured}); print(os.getpriority(os.PRIO_PROCESS, 0))")
    result = subprocess.run([sys.executable, "-c", probe], preexec_fn=lambda: os.nice(started_at),
                            capture_output=True, text=True, check=True)
    assert int(result.stdout) == expected
