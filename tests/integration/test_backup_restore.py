"""docs/production.md, "Backup and restore", as written: its commands dump a
running database and restore it into an empty one, and the restored service
re-queues the tasks that were running at the backup, while the results cache
serves entries newer than the restored rows until the documented flush."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from asyncproc import db, migrate
from asyncproc.api import create_app
from asyncproc.config import CacheSettings, DatabaseSettings, Settings
from tests.support import PROJECT_ROOT, connect, fetch, insert_task, pg_client, register_worker, task_row, wait_for

PRODUCTION = PROJECT_ROOT / "docs" / "production.md"


def _documented_commands() -> list[str]:
    """The bash block of "Backup and restore" that dumps and restores, one command a line."""
    section = PRODUCTION.read_text().split("## Backup and restore")[1].split("\n## ")[0]
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", section, re.S) if "pg_dump" in b]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def _run(command: str, cwd: Path, clients: dict[str, str], **env: str) -> None:
    program = command.split()[0]
    if program in clients:
        command = clients[program] + command[len(program):]
    done = subprocess.run(["bash", "-c", command], cwd=cwd, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (command, done.stderr)


def _api(url: str, redis_url: str):
    return create_app(Settings(db=DatabaseSettings(url=url), cache=CacheSettings(url=redis_url)))


def test_the_documented_backup_and_restore(empty_database, redis_url, tmp_path):
    # A Redis database of this test's own: the flush must not touch what other tests cache.
    cache_url = redis_url.rsplit("/", 1)[0] + "/13"
    source, target = empty_database(), empty_database()
    with db.connect(source) as conn:
        migrate.apply_all(conn, Settings().migrations_dir)
    with connect(source) as conn:
        running = insert_task(conn)
        assert fetch(conn, register_worker(conn))["args"]["task_id"] == str(running)
        pending = insert_task(conn)
    dump, restore, flush = _documented_commands()
    clients = {name: pg_client(source, name) for name in ("pg_dump", "pg_restore")}

    _run(dump, tmp_path, clients, DATABASE_URL=source)
    # After the backup the pending task is cancelled, and its final state cached.
    app = _api(source, cache_url)
    try:
        assert app.test_client().post(f"/results/{pending}/cancel").status_code == 200
        assert app.test_client().get(f"/results/{pending}").get_json()["status"] == "cancelled"
    finally:
        app.extensions["asyncproc"].close()

    _run(restore, tmp_path, clients, DATABASE_URL=target)
    restored = _api(target, cache_url)
    try:
        with connect(target) as conn:
            assert task_row(conn, pending)["status"] == "pending"
            # The cache's entry is newer than the restored row, so it wins ...
            assert restored.test_client().get(f"/results/{pending}").get_json()["status"] == "cancelled"
            _run(flush, tmp_path, clients, REDIS_URL=cache_url)
            # ... until the flush: then the restored database answers.
            assert restored.test_client().get(f"/results/{pending}").get_json()["status"] == "pending"

            # The task running at the backup belongs to a worker whose heartbeat is as old as the
            # backup: the sweep re-queues it once that is older than ASYNCPROC_STALLED_SECONDS (1 s here).
            assert task_row(conn, running)["status"] == "running"
            wait_for(lambda: conn.execute(db.query("tasks_sweep"), {"stalled_seconds": 1}).fetchone()["requeued"], 30,
                     "the sweep to re-queue the task running at the backup")
            assert task_row(conn, running)["status"] == "pending"
    finally:
        restored.extensions["asyncproc"].close()
