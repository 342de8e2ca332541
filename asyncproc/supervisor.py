"""`asyncproc up`: the whole service on one machine, started and stopped as one.

Steps: take the data directory's lock, find or start a database, apply
migrations, start the API and a worker, wait until the API answers /health,
then wait. The first Ctrl-C or SIGTERM stops everything gracefully: running
tasks may finish for the grace period. A second one stops at once: the worker
re-queues the tasks it cuts short. Either child dying stops everything too.
The embedded database stops last.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from asyncproc import db, migrate
from asyncproc.config import Settings
from asyncproc.embedded import EmbeddedPostgres
from asyncproc.locate import EMBEDDED_DATABASE
from asyncproc.uplock import UpLock

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_POLL_SECONDS = 0.1
HEALTH_TIMEOUT_SECONDS = 60.0
# After a second Ctrl-C: how long the children get to re-queue and exit before they are killed.
HURRY_SECONDS = 15.0


class UpError(Exception):
    pass


class _Signals:
    """Counts SIGINT and SIGTERM. The terminal sends Ctrl-C to `up` alone: its
    children run in process groups of their own, and hear only what `up` forwards."""

    def __init__(self) -> None:
        self.count = 0
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame) -> None:
        self.count += 1


def run(settings: Settings, bind: str, concurrency: int) -> int:
    lock = UpLock(settings.data_dir)
    lock.acquire()
    signals = _Signals()
    embedded = None
    children: list[subprocess.Popen] = []
    try:
        _check_port_free(bind)
        database_url = settings.db.url
        if database_url is None:
            embedded = EmbeddedPostgres(settings.data_dir / "postgres")
            embedded.start()
            database_url = embedded.ensure_database(EMBEDDED_DATABASE)
        _migrate(settings, database_url)
        env = {**os.environ, "DATABASE_URL": database_url}
        children.append(_spawn(["api", "--bind", bind], env))
        children.append(_spawn(["worker", "--concurrency", str(concurrency)], env))
        api_url = f"http://{bind}"
        if not _wait_healthy(_health_url(bind), children, signals):
            return 1 if signals.count == 0 else 0
        lock.publish(api=api_url)
        print(f"asyncproc is up: {api_url}  (Ctrl-C stops it gracefully, a second Ctrl-C at once)", flush=True)
        if embedded is not None:
            print(f"  DATABASE_URL={database_url}", flush=True)
            print("  psql: `asyncproc psql` in this directory; other asyncproc commands here find it too", flush=True)
        return _wait(children, signals)
    finally:
        _stop_children(children, settings.worker.shutdown_grace_seconds + 10, signals)
        if embedded is not None:
            embedded.stop()
        lock.release()


def _health_url(bind: str) -> str:
    host, _, port = bind.rpartition(":")
    if host in ("0.0.0.0", "", "[::]", "::"):
        host = "127.0.0.1"
    return f"http://{host}:{port}/health"


def _check_port_free(bind: str) -> None:
    host, _, port = bind.rpartition(":")
    with socket.socket() as sock:
        # As gunicorn binds: a port left in TIME_WAIT by our last run is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), int(port)))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UpError(f"port {port} on {host} is in use by another program; choose another with --bind HOST:PORT") from None
            raise UpError(f"cannot listen on {bind}: {exc.strerror}") from None


def _migrate(settings: Settings, database_url: str) -> None:
    with db.connect(database_url, settings.db, "asyncproc-migrate") as conn:
        applied = migrate.apply_all(conn, settings.migrations_dir)
    if applied:
        log.info("applied migrations: %s", ", ".join(applied))


def _die_with_parent() -> None:
    # If `up` is killed outright, its children go too, instead of holding the
    # port; the database stays, and the next `up` adopts it.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _spawn(arguments: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "asyncproc.cli", *arguments], env=env, preexec_fn=_die_with_parent, process_group=0
    )


def _name(child: subprocess.Popen) -> str:
    return child.args[3]


def _wait_healthy(url: str, children: list[subprocess.Popen], signals: _Signals) -> bool:
    """True once the API answers 200 on /health; False when stopped or a child died first."""
    deadline = time.monotonic() + HEALTH_TIMEOUT_SECONDS
    while not signals.count:
        for child in children:
            if child.poll() is not None:
                log.error("%s exited with code %s before the service was up", _name(child), child.returncode)
                return False
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise UpError(f"the API did not answer {url} within {HEALTH_TIMEOUT_SECONDS:g}s")
        time.sleep(_POLL_SECONDS)
    return False


def _wait(children: list[subprocess.Popen], signals: _Signals) -> int:
    while not signals.count:
        for child in children:
            if child.poll() is not None:
                log.error("%s exited with code %s; stopping everything", _name(child), child.returncode)
                return 1
        time.sleep(_POLL_SECONDS)
    log.info("stopping: running tasks may finish (a second Ctrl-C stops at once)")
    return 0


def _stop_children(children: list[subprocess.Popen], timeout: float, signals: _Signals) -> None:
    """SIGTERM each child once; a further signal to `up` forwards SIGINT, which stops them at once."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    # The signal that began this stop asked for a graceful one; any further
    # signal, however soon it came, asks for haste.
    graceful = 1 if signals.count else 0
    deadline = time.monotonic() + timeout
    hurried = False
    while any(child.poll() is None for child in children) and time.monotonic() < deadline:
        if not hurried and signals.count > graceful:
            hurried = True
            log.warning("stopping now: tasks still running are re-queued")
            for child in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGINT)
            deadline = min(deadline, time.monotonic() + HURRY_SECONDS)
        time.sleep(_POLL_SECONDS)
    for child in children:
        if child.poll() is None:
            log.warning("%s (pid %s) did not stop in time; killing it", _name(child), child.pid)
            child.kill()
            child.wait()
