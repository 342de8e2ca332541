"""`asyncproc up`: the whole service on one machine, started and stopped as one.

Steps: find or start a database, apply migrations, start the API and a worker,
then wait. Ctrl-C or SIGTERM, or either child dying, stops everything it
started, the embedded database last.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time

from asyncproc import db, migrate
from asyncproc.config import Settings
from asyncproc.embedded import EmbeddedPostgres

log = logging.getLogger(__name__)

EMBEDDED_DATABASE = "asyncproc"
_PR_SET_PDEATHSIG = 1
_POLL_SECONDS = 0.2


def run(settings: Settings, bind: str, concurrency: int) -> int:
    embedded = None
    stop_requested: list[int] = []

    def on_signal(signum, _frame):
        stop_requested.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    children: list[subprocess.Popen] = []
    try:
        database_url = settings.database_url
        if database_url is None:
            embedded = EmbeddedPostgres(settings.data_dir / "postgres")
            embedded.start()
            database_url = embedded.ensure_database(EMBEDDED_DATABASE)
        _migrate(settings, database_url)
        env = {**os.environ, "DATABASE_URL": database_url}
        children.append(_spawn(["api", "--bind", bind], env))
        children.append(_spawn(["worker", "--concurrency", str(concurrency)], env))
        print(f"asyncproc is up: http://{bind}  (Ctrl-C stops it)", flush=True)
        return _wait(children, stop_requested)
    finally:
        _stop_children(children, settings.shutdown_grace_seconds + 10)
        if embedded is not None:
            embedded.stop()


def _migrate(settings: Settings, database_url: str) -> None:
    with db.connect(database_url, settings, "asyncproc-migrate") as conn:
        applied = migrate.apply_all(conn, settings.migrations_dir)
    if applied:
        log.info("applied migrations: %s", ", ".join(applied))


def _die_with_parent() -> None:
    # If `up` is killed outright, its children go too, instead of holding the
    # port; the database stays, and the next `up` adopts it.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _spawn(arguments: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "asyncproc.cli", *arguments], env=env, preexec_fn=_die_with_parent
    )


def _wait(children: list[subprocess.Popen], stop_requested: list[int]) -> int:
    while not stop_requested:
        for child in children:
            if child.poll() is not None:
                log.error("%s exited with code %s; stopping everything", " ".join(child.args[2:4]), child.returncode)
                return 1
        time.sleep(_POLL_SECONDS)
    log.info("stopping (%s)", signal.Signals(stop_requested[0]).name)
    return 0


def _stop_children(children: list[subprocess.Popen], timeout: float) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("pid %s did not stop in time; killing it", child.pid)
            child.kill()
            child.wait()
