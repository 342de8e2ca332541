"""The tests run beside a running `asyncproc up`, in its directory, as the README's
"second terminal" does: they neither find its embedded database nor join it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.support import PROJECT_ROOT, free_port, user_env, wait_for

pytestmark = pytest.mark.e2e

# The tests that start commands, a worker among them, without DATABASE_URL.
BESIDE = [
    "tests/unit/test_cli.py",
    "tests/unit/test_config.py",
]


def _workers_ever_registered(url: str) -> int | None:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT pg_sequence_last_value(pg_get_serial_sequence('procrastinate_workers', 'id')::regclass)"
        ).fetchone()[0]


def _stop(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM to the process's whole session (what it started too); SIGKILL when it does not end in time."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def test_the_tests_beside_a_running_up_leave_its_database_alone(tmp_path: Path):
    up_dir = tmp_path / "checkout"
    up_dir.mkdir()
    port = free_port()
    log = tmp_path / "up.log"
    up = subprocess.Popen(
        [sys.executable, "-m", "asyncproc.cli", "up", "--bind", f"127.0.0.1:{port}"],
        cwd=up_dir, env=user_env(ASYNCPROC_COMPUTE_SECONDS="0"),
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        ready = f"asyncproc is up: http://127.0.0.1:{port}"
        wait_for(lambda: ready in log.read_text() or up.poll() is not None, 90, f"asyncproc up ({log})", interval=0.2)
        assert ready in log.read_text(), log.read_text()
        url = re.search(r"DATABASE_URL=(\S+)", log.read_text()).group(1)
        # The up's own worker may register after the API answers.
        registered = wait_for(lambda: _workers_ever_registered(url), 60, "the up's worker to register", interval=0.2)

        # The tests' own DATABASE_URL is kept, as a developer's would be: only discovery is in question.
        inner_env = user_env(**{k: os.environ[k] for k in ("DATABASE_URL", "REDIS_URL") if k in os.environ})
        inner = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(str(PROJECT_ROOT / path) for path in BESIDE)],
            cwd=up_dir, env=inner_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        try:
            output, _ = inner.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            _stop(inner, 10)
            pytest.fail(f"the tests hung beside `asyncproc up`: {inner.communicate()[0][-3000:]}")
        assert inner.returncode == 0, output[-3000:]
        assert _workers_ever_registered(url) == registered, "a test's worker joined the running up's database"
    finally:
        _stop(up, 60)
