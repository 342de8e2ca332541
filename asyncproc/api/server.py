"""gunicorn serving create_app(): the API's only server."""

from __future__ import annotations

import logging
import os
import resource
import shutil
import tempfile

import psycopg
from gunicorn import glogging
from gunicorn.app.base import BaseApplication

from asyncproc import db, logs, migrate
from asyncproc.config import Settings

log = logging.getLogger(__name__)


class ApiServer(BaseApplication):
    def __init__(self, settings: Settings, bind: str, workers: int):
        self.settings = settings
        self.options = {
            "bind": bind,
            "workers": workers,
            # One event loop per process holds every connection, slow or waiting;
            # Flask runs on ASYNCPROC_API_THREADS threads (asyncproc.api.asgi).
            "worker_class": "asyncproc.api.asgi.Worker",
            "timeout": 30,
            "graceful_timeout": 10,
            "keepalive": 5,
            "accesslog": None,
            "errorlog": "-",
            "logger_class": _gunicorn_logger(settings.log_format),
            "loglevel": settings.log_level.lower(),
            "proc_name": "asyncproc-api",
            # Several APIs may run on one host (tests, scaling out); none needs it.
            "control_socket_disable": True,
            # X-Forwarded-Proto (and so Secure cookies behind a TLS proxy) is believed from the
            # proxies X-Forwarded-For is, and from no other peer: not even gunicorn's 127.0.0.1.
            "forwarded_allow_ips": ",".join(settings.api.trusted_proxies),
        }
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        # Runs in each gunicorn worker after fork, so every process opens its own pool.
        from asyncproc.api import create_app

        from asyncproc.api.asgi import WsgiBridge

        logs.configure(self.settings.log_level, self.settings.log_format)
        return WsgiBridge(create_app(self.settings), self.settings.api)


def _gunicorn_logger(fmt: str) -> type[glogging.Logger]:
    """gunicorn's own lines (start-up, worker exits) in the same format as ours."""

    class Logger(glogging.Logger):
        def setup(self, cfg) -> None:
            super().setup(cfg)
            for handler in self.error_log.handlers:
                handler.setFormatter(logs.formatter(fmt))
                handler.addFilter(logs.RequestIdFilter())

    return Logger


def _refuse_a_schema_that_does_not_serve_it(settings: Settings) -> None:
    """MigrationError when the database's schema does not serve this release (docs/production.md, "Upgrading")."""
    try:
        conn = db.connect(settings.db.url, settings.db, "asyncproc-api")
    except psycopg.OperationalError as exc:
        # The API starts without its database and answers 503 until it is
        # back; a worker, which cannot start without it, checks at its lease.
        log.warning("cannot check the database's schema generation (%s); starting without the check", db.describe_error(exc))
        return
    with conn:
        migrate.check_schema_serves_this_code(conn)


def _raise_open_files_limit() -> None:
    """Each waiting client holds a socket: allow as many as the hard limit does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as exc:
        log.warning("open files stay limited to %s (%s): fewer clients can wait at once", soft, exc)


def _yield_cpu_to_workers(nice: int) -> None:
    """Lower this process's CPU priority, and so its gunicorn processes', to `nice`; never raise it.

    The kernel shares the cores equally between processes. On a host that runs
    workers too, an API at their priority accepts tasks faster than they finish
    them under sustained load, and the backlog grows for as long as the load
    lasts; yielding to them, it accepts as fast as they drain. Elsewhere it
    changes nothing: nice only orders processes that compete for a core (and
    only within one container's cgroup).
    """
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if nice > current:
        os.setpriority(os.PRIO_PROCESS, 0, nice)


def run(settings: Settings, bind: str, workers: int) -> None:
    _refuse_a_schema_that_does_not_serve_it(settings)
    _raise_open_files_limit()
    _yield_cpu_to_workers(settings.api.nice)
    # /metrics must add up every gunicorn process. prometheus_client keeps each
    # process's counters in files under PROMETHEUS_MULTIPROC_DIR, which it reads
    # when it is first imported: in the workers, after this fork. One fresh
    # directory per run, so counts never mix runs, removed when gunicorn exits.
    # Only the arbiter removes it: a gunicorn worker leaves by SystemExit
    # through this very frame (it was forked inside it), and a context manager
    # here deleted the directory under the other workers, whose next request
    # then failed with a 500.
    metrics_dir = tempfile.mkdtemp(prefix="asyncproc-metrics-")
    arbiter = os.getpid()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        ApiServer(settings, bind, workers).run()
    finally:
        if os.getpid() == arbiter:
            shutil.rmtree(metrics_dir, ignore_errors=True)
