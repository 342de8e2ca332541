"""`asyncproc bench --profile --quick` says where a task's time goes: by process, statement, function and worker step."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

NUMBER = r"[\d,.]+"


def test_bench_profile_quick_reports_each_table(tmp_path):
    env = {**os.environ, "ASYNCPROC_LOG_LEVEL": "WARNING"}
    result = subprocess.run(
        [sys.executable, "-m", "asyncproc.cli", "bench", "--profile", "--quick"],
        env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = result.stdout
    for isolation in ("process (a sync handler's default)", "thread", "async handler"):
        row = re.search(rf"^\| {re.escape(isolation)} \| ({NUMBER}) \| ({NUMBER}) \| ({NUMBER}) \| ({NUMBER}) \|", report, re.M)
        assert row, f"no drain row for {isolation}:\n{report}"
        rate, postgres_ms, workers_ms, wal = (float(value.replace(",", "")) for value in row.groups())
        assert rate > 0 and postgres_ms > 0 and workers_ms > 0 and wal > 0, row.group(0)
    if os.environ.get("DATABASE_URL"):
        # A server of the caller's is used as it is, and may not load pg_stat_statements.
        assert "| top level | calls/task | µs/task | statement |" in report or "pg_stat_statements is not loaded" in report
    else:
        # The embedded server loads it: the claim, nested in the fetch, is there.
        assert "| top level | calls/task | µs/task | statement |" in report
        assert "UPDATE tasks SET status" in report, report
    assert re.search(r"^\| asyncproc_claim_on_fetch \| 1\.00 \|", report, re.M), report
    for step in ("fetch (a statement per free slots' worth)", "outcome writes (the completer's batches)",
                 "results cache writes (written behind)", "Procrastinate's loop, per job (a run included)"):
        assert re.search(rf"^\| {re.escape(step)} \| \d+% \| \d+ \|", report, re.M), f"no step {step!r}:\n{report}"
    assert re.search(r"^\| psycopg \(PostgreSQL client\) \| \d+% \| \d+ \|", report, re.M), report
