"""The asyncproc command line: argument parsing only; each command calls one run()."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import uuid
from datetime import timedelta

import psycopg

from asyncproc import logs
from asyncproc.config import Settings
from asyncproc.embedded import EmbeddedError
from asyncproc.errors import AsyncprocError, ConfigError
from asyncproc.keys import KeyCommandError
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

    retry = commands.add_parser("retry", help="re-queue a failed or cancelled task, or every recent failure")
    target = retry.add_mutually_exclusive_group(required=True)
    target.add_argument("task_id", nargs="?", type=_task_id, help="the task to retry")
    target.add_argument("--failed", action="store_true", help="retry every task that failed within --since")
    retry.add_argument("--since", type=_duration, default=timedelta(hours=1), help="with --failed: 30m, 1h, 2d ... (default 1h)")
    retry.add_argument("--operation", help="with --failed: only this operation")

    cancel = commands.add_parser("cancel", help="cancel a pending or running task")
    cancel.add_argument("task_id", type=_task_id)

    worker = commands.add_parser("worker", help="run a worker")
    worker.add_argument(
        "--concurrency", type=int, default=settings.worker_concurrency, help="tasks run at once (ASYNCPROC_WORKER_CONCURRENCY)"
    )

    key_commands = commands.add_parser("keys", help="API keys for ASYNCPROC_AUTH=required").add_subparsers(
        dest="keys_command", required=True, metavar="ACTION"
    )
    key_commands.add_parser("create", help="create a key and print it (shown only this once)").add_argument("name")
    key_commands.add_parser("revoke", help="revoke the live key with this name").add_argument("name")
    key_commands.add_parser("list", help="list keys (never the keys themselves)")
    worker.add_argument(
        "--metrics-port",
        type=int,
        default=settings.worker_metrics_port,
        help="serve Prometheus metrics on this port (ASYNCPROC_WORKER_METRICS_PORT); off by default",
    )
    bench = commands.add_parser("bench", help="start the service and measure it (embedded PostgreSQL without DATABASE_URL)")
    bench.add_argument("--quick", action="store_true", help="run every figure briefly (about a minute)")
    return parser


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> timedelta:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 30m, 1h or 2d")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def _task_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a task id") from None


def _operator_action(settings: Settings, args: argparse.Namespace) -> int:
    from asyncproc import db, service
    from asyncproc.cache import ResultCache

    pool = db.open_pool(settings, "asyncproc-cli", 1)
    cache = ResultCache(settings.redis_url, settings.result_ttl_seconds)
    try:
        if args.command == "cancel":
            print(service.encode_document(service.cancel(pool, cache, args.task_id)).decode())
        elif args.failed:
            print(f"re-queued {service.retry_failed(pool, args.since, args.operation)} task(s)")
        else:
            print(service.encode_document(service.retry(pool, cache, args.task_id)).decode())
    finally:
        pool.close()
    return 0


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
    logs.configure(settings.log_level, settings.log_format)
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
        if args.command in ("retry", "cancel"):
            _require_database(settings)
            return _operator_action(settings, args)
        if args.command == "api":
            from asyncproc.api import server

            _require_database(settings)
            server.run(settings, bind=args.bind, workers=args.workers)
            return 0
        if args.command == "keys":
            from asyncproc import db, keys

            with db.connect(_require_database(settings), settings, "asyncproc-keys") as conn:
                return keys.run(conn, args.keys_command, getattr(args, "name", None))
        if args.command == "worker":
            from worker import main as worker_main

            _require_database(settings)
            return worker_main.run(settings, concurrency=args.concurrency, metrics_port=args.metrics_port)
        if args.command == "bench":
            from asyncproc.bench import run as bench

            return bench.run(settings, quick=args.quick)
    except ConfigError as exc:
        print(f"asyncproc: configuration error: {exc}", file=sys.stderr)
        return 2
    except AsyncprocError as exc:
        print(f"asyncproc: {exc.message}", file=sys.stderr)
        return 1
    except (EmbeddedError, MigrationError, KeyCommandError) as exc:
        print(f"asyncproc: {exc}", file=sys.stderr)
        return 1
    except psycopg.OperationalError as exc:
        print(f"asyncproc: cannot reach the database: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
