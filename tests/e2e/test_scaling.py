"""Scaling out: three worker processes and two separate API instances on one database, under load.

Shows that no task runs twice (so never twice at once), none is lost, and the
work spreads across the workers. Each run of the `whoami` operation appends
(task, worker pid, start, end) to a file of its worker's own.
"""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import pytest
import requests

from asyncproc import db, migrate
from asyncproc.config import Settings
from tests.conftest import free_port, wait_for
from tests.e2e.conftest import _healthy, _start, service_env, stop_service

pytestmark = pytest.mark.e2e

APIS = 2
WORKERS = 3
CONCURRENCY = 4
TASKS = 240
HANDLER_SECONDS = 0.02


def test_many_workers_and_apis_on_one_database_run_each_task_exactly_once(tmp_path, empty_database):
    database_url = empty_database()
    with db.connect(database_url) as conn:
        migrate.apply_all(conn, Settings().migrations_dir)
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    env = service_env(database_url, None, {"ASYNCPROC_TEST_RUNS_DIR": str(runs_dir)})
    api_urls = [f"http://127.0.0.1:{free_port()}" for _ in range(APIS)]
    apis = [
        _start(["api", "--bind", url.removeprefix("http://"), "--workers", "1"], env, tmp_path / f"api-{i}.log")
        for i, url in enumerate(api_urls)
    ]
    workers = [
        _start(["worker", "--concurrency", str(CONCURRENCY)], env, tmp_path / f"worker-{i}.log") for i in range(WORKERS)
    ]
    try:
        for url in api_urls:
            wait_for(lambda: _healthy(url), 30, f"the API at {url} (logs in {tmp_path})", interval=0.1)
        with db.connect(database_url) as conn:
            # Every worker is listening before the load starts, so each can compete from the first task.
            wait_for(
                lambda: conn.execute("SELECT count(*) AS n FROM procrastinate_workers").fetchone()["n"] == WORKERS,
                30,
                f"{WORKERS} workers to register (logs in {tmp_path})",
                interval=0.1,
            )

        def post(index: int) -> tuple[int, str | None]:
            response = requests.post(
                f"{api_urls[index % APIS]}/process",
                json={"operation": "whoami", "data": {"seconds": HANDLER_SECONDS}},
                timeout=30,
            )
            return response.status_code, response.json().get("task_id")

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, range(TASKS)))
        assert Counter(status for status, _ in answers) == {202: TASKS}
        accepted = {task_id for _, task_id in answers}
        assert len(accepted) == TASKS

        with db.connect(database_url) as conn:
            wait_for(
                lambda: conn.execute("SELECT count(*) AS n FROM tasks WHERE status = 'completed'").fetchone()["n"] == TASKS,
                120,
                f"all {TASKS} tasks to complete (logs in {tmp_path})",
                interval=0.1,
            )
            rows = {
                str(row["task_id"]): row
                for row in conn.execute("SELECT task_id, status, attempts, result, started_at, completed_at FROM tasks")
            }
    finally:
        exit_codes = stop_service(apis + workers)
    assert exit_codes == [0] * (APIS + WORKERS), f"a process did not exit cleanly; logs in {tmp_path}"

    # None lost: every accepted task is in the ledger, completed on its first attempt.
    assert set(rows) == accepted
    assert {(row["status"], row["attempts"]) for row in rows.values()} == {("completed", 1)}

    # None ran twice, so none ran twice at the same time: one recorded run per task,
    # inside the window the ledger gives that task's single attempt.
    runs = [json.loads(line) for path in runs_dir.iterdir() for line in path.read_text().splitlines()]
    per_task = Counter(run["task_id"] for run in runs)
    assert per_task == Counter(accepted), "some task ran more than once, or not at all"
    for run in runs:
        row = rows[run["task_id"]]
        started = datetime.fromtimestamp(run["started"], timezone.utc)
        finished = datetime.fromtimestamp(run["finished"], timezone.utc)
        assert row["started_at"] <= started <= finished <= row["completed_at"], run
        assert row["result"] == {"pid": run["pid"]}

    # The work spread: every worker process ran a fair share.
    per_worker = Counter(run["pid"] for run in runs)
    assert set(per_worker) == {process.pid for process in workers}, per_worker
    assert min(per_worker.values()) >= TASKS // (WORKERS * 4), per_worker
