"""A worker asked to stop while its lease is being registered stops: the signal is not lost in the hand-over."""

from __future__ import annotations

import signal
import subprocess
import sys

import psycopg
import pytest

from tests.conftest import wait_for
from tests.e2e.conftest import service_env

pytestmark = pytest.mark.e2e


def test_a_sigterm_while_the_lease_is_being_registered_stops_the_worker(tmp_path, database_url, clean_db):
    env = service_env(database_url, None)
    with psycopg.connect(database_url) as holder:
        # The registration's INSERT waits behind this lock: the worker is inside acquire(), past its
        # last look at whether it was asked to stop, when the signal comes.
        holder.execute("LOCK TABLE procrastinate_workers IN ACCESS EXCLUSIVE MODE")
        with open(tmp_path / "worker.log", "wb") as log:
            worker = subprocess.Popen([sys.executable, "-m", "asyncproc.cli", "worker"], env=env,
                                      stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(
                lambda: clean_db.execute(
                    "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND query ILIKE '%%register_worker%%'"
                ).fetchone()["n"] == 1,
                30, "the worker's registration to wait for the lock", interval=0.05,
            )
            worker.send_signal(signal.SIGTERM)
            holder.rollback()
            # It stops, and gives back the lease it had just registered.
            assert worker.wait(timeout=30) == 0, (tmp_path / "worker.log").read_text()
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    assert clean_db.execute("SELECT count(*) AS n FROM procrastinate_workers").fetchone()["n"] == 0
