"""The asyncproc command line: argument parsing only; each command calls one run()."""

from __future__ import annotations

import argparse
import logging
import sys

import psycopg

from asyncproc import logs
from asyncproc.config import Settings
from asyncproc.embedded import EmbeddedError
from asyncproc.errors import ConfigError
from asyncproc.migrate import MigrationError

log = logging.getLogger("asyncproc")


def _parser(settings: Settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asyncproc", description="A task service whose queue is PostgreSQL.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="run everything on this machine (embedded PostgreSQL without DATABASE_URL)")
    up.add_argument("--bind", default=settings.bind, help="HOST:PORT for the API (ASYNCPROC_BIND)")
    up.add_argument("--concurrency", type=int, default=settings.worker_concurrency, help="tasks the worker runs at once")

    commands.add_parser("migrate", help="apply pending database migrations")

    api = commands.add_parser("api", help="serve the HTTP API with gunicorn")
    api.add_argument("--bind", default=settings.bind, help="HOST:PORT (ASYNCPROC_BIND)")
    api.add_argument("--workers", type=int, default=settings.api_workers, help="gunicorn worker processes")

    worker = commands.add_parser("worker", help="run a worker")
    worker.add_argument(
        "--concurrency", type=int, default=settings.worker_concurrency, help="tasks run at once (ASYNCPROC_WORKER_CONCURRENCY)"
    )
    bench = commands.add_parser("bench", help="start the service and measure it (embedded PostgreSQL without DATABASE_URL)")
    bench.add_argument("--quick", action="store_true", help="run every figure briefly (about a minute)")
    return parser


def _require_database(settings: Settings) -> str:
    if settings.database_url is None:
        raise ConfigError("DATABASE_URL is not set (only `asyncproc up` starts an embedded database)")
    return settings.database_url


def main(argv: list[str] | None = None) -> int:
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"asyncproc: configuration error: {exc}", file=sys.stderr)
        return 2
    args = _parser(settings).parse_args(argv)
    logs.configure(settings.log_level)
    try:
        if args.command == "up":
            from asyncproc import supervisor

            return supervisor.run(settings, bind=args.bind, concurrency=args.concurrency)
        if args.command == "migrate":
            from asyncproc import db, migrate

            with db.connect(_require_database(settings), settings, "asyncproc-migrate") as conn:
                applied = migrate.apply_all(conn, settings.migrations_dir)
            print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else ""))
            return 0
        if args.command == "api":
            from asyncproc.api import server

            _require_database(settings)
            server.run(settings, bind=args.bind, workers=args.workers)
            return 0
        if args.command == "worker":
            from worker import main as worker_main

            _require_database(settings)
            return worker_main.run(settings, concurrency=args.concurrency)
        if args.command == "bench":
            from asyncproc.bench import run as bench

            return bench.run(settings, quick=args.quick)
    except ConfigError as exc:
        print(f"asyncproc: configuration error: {exc}", file=sys.stderr)
        return 2
    except (EmbeddedError, MigrationError) as exc:
        print(f"asyncproc: {exc}", file=sys.stderr)
        return 1
    except psycopg.OperationalError as exc:
        print(f"asyncproc: cannot reach the database: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
