"""`asyncproc up` on a machine with no DATABASE_URL: the README's quick start."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.conftest import free_port, wait_for

pytestmark = pytest.mark.e2e


def _up(data_dir: Path, port: int, log_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(ASYNCPROC_DATA_DIR=str(data_dir), ASYNCPROC_COMPUTE_SECONDS="0", ASYNCPROC_BIND=f"127.0.0.1:{port}")
    return subprocess.Popen(
        [sys.executable, "-m", "asyncproc.cli", "up"], env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT
    )


def _ready(log_path: Path, port: int) -> bool:
    if f"asyncproc is up: http://127.0.0.1:{port}" not in log_path.read_text():
        return False
    try:
        return requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except requests.ConnectionError:
        return False


def _refuses(port: int) -> bool:
    try:
        requests.get(f"http://127.0.0.1:{port}/health", timeout=1)
    except requests.ConnectionError:
        return True
    except requests.Timeout:
        # Still listening while it shuts down.
        return False
    return False


def _postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postgres" / "pgdata" / "postmaster.pid").read_text().split()[0])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_up_runs_everything_keeps_data_and_adopts_a_crashed_server(tmp_path):
    data_dir = tmp_path / "data"
    port = free_port()
    first_log = tmp_path / "first.log"
    up = _up(data_dir, port, first_log)
    try:
        wait_for(lambda: _ready(first_log, port), 90, f"asyncproc up to be ready ({first_log})", interval=0.2)
        response = requests.post(
            f"http://127.0.0.1:{port}/process", json={"data": {"input": 42, "operation": "compute"}}, timeout=10
        )
        task_id = response.json()["task_id"]
        result = wait_for(
            lambda: (body := requests.get(f"http://127.0.0.1:{port}/results/{task_id}", timeout=5).json())["status"]
            == "completed" and body,
            30,
            "the seed example to complete",
        )
        assert result["result"] == 499999500000
        postmaster = _postmaster_pid(data_dir)
    finally:
        # A crash: `up` dies at once. Its API and worker follow it; the database stays.
        up.send_signal(signal.SIGKILL)
        up.wait(10)
    wait_for(lambda: _refuses(port), 30, "the API to go away with its parent", interval=0.2)
    assert _alive(postmaster)

    second_log = tmp_path / "second.log"
    up = _up(data_dir, port, second_log)
    try:
        wait_for(lambda: _ready(second_log, port), 60, f"the second asyncproc up ({second_log})", interval=0.2)
        assert re.search(r"reusing the embedded PostgreSQL already running \(pid %d" % postmaster, second_log.read_text())
        kept = requests.get(f"http://127.0.0.1:{port}/results/{task_id}", timeout=5).json()
        assert kept["status"] == "completed" and kept["result"] == 499999500000
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0
    assert _refuses(port)
    assert not _alive(postmaster)
