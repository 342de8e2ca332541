"""The real service: `asyncproc api` (gunicorn) and `asyncproc worker` as processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import requests

from tests.conftest import free_port, wait_for

FINAL = {"completed", "failed", "cancelled"}


@dataclass
class Service:
    base_url: str
    logs: Path

    def post(self, body: dict, **kwargs) -> requests.Response:
        return requests.post(f"{self.base_url}/process", json=body, timeout=10, **kwargs)

    def get(self, task_id: str) -> requests.Response:
        return requests.get(f"{self.base_url}/results/{task_id}", timeout=10)

    def health(self) -> requests.Response:
        return requests.get(f"{self.base_url}/health", timeout=10)

    def submit(self, body: dict) -> str:
        response = self.post(body)
        assert response.status_code == 202, response.text
        return response.json()["task_id"]

    def wait_finished(self, task_id: str, timeout: float = 20) -> dict:
        def finished():
            body = self.get(task_id).json()
            return body if body["status"] in FINAL else None

        return wait_for(finished, timeout, f"task {task_id} to finish (logs in {self.logs})", interval=0.05)


def _start(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "wb")
    return subprocess.Popen(
        [sys.executable, "-m", "asyncproc.cli", *command], env=env, stdout=log, stderr=subprocess.STDOUT
    )


def _healthy(url: str, path: str = "/health") -> bool:
    try:
        return requests.get(f"{url}{path}", timeout=1).status_code == 200
    except (requests.ConnectionError, requests.Timeout):
        # Not listening yet, or still starting on a busy machine: look again.
        return False


def service_env(database_url: str, redis_url: str | None, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the test's API and worker processes."""
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "ASYNCPROC_COMPUTE_SECONDS": "0",
        "ASYNCPROC_RETRY_BACKOFF_SECONDS": "0.1",
        "ASYNCPROC_WORKER_POLL_SECONDS": "0.2",
        "ASYNCPROC_SHUTDOWN_GRACE_SECONDS": "5",
        "ASYNCPROC_LOG_LEVEL": "INFO",
        "ASYNCPROC_OPERATIONS_MODULE": "tests.e2e.custom_operations",
        "ASYNCPROC_PROGRESS_INTERVAL_SECONDS": "0.05",
    }
    env.pop("REDIS_URL", None)
    if redis_url:
        env["REDIS_URL"] = redis_url
    env.update(extra_env or {})
    return env


def start_service(
    tmp_dir: Path,
    database_url: str,
    redis_url: str | None,
    concurrency: int = 20,
    extra_env: dict[str, str] | None = None,
) -> tuple[Service, list[subprocess.Popen]]:
    port = free_port()
    env = service_env(database_url, redis_url, extra_env)
    processes = [
        _start(["api", "--bind", f"127.0.0.1:{port}", "--workers", "2"], env, tmp_dir / "api.log"),
        _start(["worker", "--concurrency", str(concurrency)], env, tmp_dir / "worker.log"),
    ]
    service = Service(base_url=f"http://127.0.0.1:{port}", logs=tmp_dir)
    wait_for(lambda: _healthy(service.base_url), 30, f"the API to answer /health (logs in {tmp_dir})", interval=0.1)
    metrics_port = env.get("ASYNCPROC_WORKER_METRICS_PORT")
    if metrics_port:
        # A test that reads the worker's metrics first must not find the port still closed on a busy machine.
        wait_for(lambda: _healthy(f"http://127.0.0.1:{metrics_port}", "/metrics"), 30,
                 f"the worker to answer /metrics (logs in {tmp_dir})", interval=0.1)
    return service, processes


def stop_processes(processes: list[subprocess.Popen], timeout: float = 30) -> None:
    """SIGTERM every process still running, then wait for each; kill what has not stopped in time."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def stop_service(processes: list[subprocess.Popen]) -> list[int]:
    for process in processes:
        process.send_signal(signal.SIGTERM)
    return [process.wait(30) for process in processes]


@pytest.fixture(scope="module")
def service(tmp_path_factory, database_url, redis_url) -> Iterator[Service]:
    running, processes = start_service(tmp_path_factory.mktemp("service"), database_url, redis_url)
    yield running
    assert stop_service(processes) == [0, 0], f"a process did not exit cleanly; logs in {running.logs}"
