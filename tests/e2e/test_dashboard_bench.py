"""`asyncproc bench --dashboard ROWS`, run small: every page is timed, with a verdict."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from asyncproc.bench.dashboard import PAGES

pytestmark = pytest.mark.e2e


def test_dashboard_bench_times_every_page(tmp_path):
    env = {**os.environ, "ASYNCPROC_LOG_LEVEL": "WARNING"}
    result = subprocess.run(
        [sys.executable, "-m", "asyncproc.cli", "bench", "--dashboard", "2000"],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| /dashboard")]
    assert [row.split(" | ")[0][2:] for row in rows[: len(PAGES)]] == PAGES
    assert len(rows) == len(PAGES) + 2  # and one task's page, and the second page of the list
    assert all(row.rstrip().endswith(("PASS |", "MISS |")) for row in rows), rows
