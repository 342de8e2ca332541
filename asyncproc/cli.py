"""The asyncproc command line: argument parsing only; each command calls one run()."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
import uuid
from datetime import timedelta
from typing import Any, Callable, NoReturn

import psycopg
from psycopg.conninfo import conninfo_to_dict

from asyncproc import contract, db, locate, logs, supervisor
from asyncproc.config import BIND_EXPECTED, DatabaseSettings, Settings, integer_expected, parse_bind, parse_duration, parse_integer
from asyncproc.embedded import EmbeddedError
from asyncproc.errors import AsyncprocError, ConfigError
from asyncproc.keys import KeyCommandError
from asyncproc.limits import LimitsError
from asyncproc.quotas import Quota
from asyncproc.migrate import MigrationError
from asyncproc.operations import load_user_module
from asyncproc.schedules import ScheduleError
from asyncproc.uplock import AlreadyRunning

log = logging.getLogger("asyncproc")


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, verbose_flag: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if verbose_flag:
            # Before or after the command's name alike; SUPPRESS, so that a
            # command's parser does not undo an `asyncproc -v` given before it.
            self.add_argument(
                "-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                help="also print log lines (a command that answers at once prints only its answer and warnings)",
            )

    def error(self, message: str) -> NoReturn:
        # One line, like a bad environment variable; the usage is one --help away.
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _checked(parse: Callable[[str], object], expected: str) -> Callable[[str], object]:
    """A flag type that checks a value as config.py checks the same variable."""

    def check(text: str) -> object:
        try:
            return parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected {expected}") from None

    check.__name__ = expected
    return check


def _integer(low: int, high: int) -> Callable[[str], object]:
    return _checked(lambda text: parse_integer(text, low, high), integer_expected(low, high))


_BIND = _checked(parse_bind, BIND_EXPECTED)


def _limit(parse: Callable[[str], object]) -> Callable[[str], object]:
    """A limit's value, or `none` to remove the limit."""

    def check(text: str) -> object:
        return text if text == "none" else parse(text)

    check.__name__ = parse.__name__
    return check


def _parser() -> argparse.ArgumentParser:
    # Defaults come from the environment after parsing, so that --help works
    # whatever the environment holds.
    parser = _Parser(prog="asyncproc", description="A task service whose queue is PostgreSQL.")
    parser.set_defaults(verbose=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="run everything on this machine (embedded PostgreSQL without DATABASE_URL)")
    up.add_argument("--bind", type=_BIND, help="HOST:PORT for the API (default ASYNCPROC_BIND, 127.0.0.1:8000)")
    up.add_argument("--concurrency", type=_integer(1, 1000), help="tasks the worker runs at once (ASYNCPROC_WORKER_CONCURRENCY)")

    migrate = commands.add_parser("migrate", help="apply pending database migrations")
    migrate.add_argument(
        "--wait",
        type=_integer(0, 3600),
        default=0,
        metavar="SECONDS",
        help="retry connecting this long while the database does not answer yet (default 0)",
    )

    api = commands.add_parser("api", help="serve the HTTP API with gunicorn")
    api.add_argument("--bind", type=_BIND, help="HOST:PORT (default ASYNCPROC_BIND, 127.0.0.1:8000)")
    api.add_argument("--workers", type=_integer(1, 64), help="gunicorn worker processes (ASYNCPROC_API_WORKERS)")

    retry = commands.add_parser("retry", help="re-queue a failed or cancelled task, or every recent failure")
    target = retry.add_mutually_exclusive_group(required=True)
    target.add_argument("task_id", nargs="?", type=_task_id, help="the task to retry")
    target.add_argument("--failed", action="store_true", help="retry every task that failed within --since")
    retry.add_argument("--since", type=_duration, default=timedelta(hours=1), help="with --failed: 30m, 1h, 2d ... (default 1h)")
    retry.add_argument("--operation", help="with --failed: only this operation")

    cancel = commands.add_parser("cancel", help="cancel a pending or running task")
    cancel.add_argument("task_id", type=_task_id)

    prune = commands.add_parser("prune", help="delete finished tasks past ASYNCPROC_RETAIN_* now (the workers also do)")
    prune.add_argument("--dry-run", action="store_true", help="only say how many tasks would be deleted")

    worker = commands.add_parser("worker", help="run a worker")
    worker.add_argument("--concurrency", type=_integer(1, 1000), help="tasks run at once (ASYNCPROC_WORKER_CONCURRENCY)")
    worker.add_argument(
        "--metrics-port",
        type=_integer(1, 65535),
        help="serve Prometheus metrics on this port (ASYNCPROC_WORKER_METRICS_PORT); off by default",
    )

    key_commands = commands.add_parser("keys", help="API keys for ASYNCPROC_AUTH=required").add_subparsers(
        dest="keys_command", required=True, metavar="ACTION"
    )
    create_key = key_commands.add_parser("create", help="create a key and print it (shown only this once)")
    create_key.add_argument("name")
    create_key.add_argument(
        "--dashboard", choices=("read", "operate"), help="let the key sign in to /dashboard: to read, or also to retry and cancel"
    )
    key_commands.add_parser("revoke", help="revoke the live key with this name").add_argument("name")
    key_commands.add_parser("list", help="list keys (never the keys themselves)")
    limit = key_commands.add_parser("limit", help="set a key's quota; a limit not given is removed")
    limit.add_argument("name")
    limit.add_argument("--max-active", dest="max_active_tasks", type=int, help="pending plus running tasks")
    limit.add_argument("--max-priority", dest="max_priority", type=int, help="highest priority a task may ask for")
    limit.add_argument("--max-batch", dest="max_batch_tasks", type=int, help="tasks in one POST /process/batch")
    limit.add_argument("--max-timeout-seconds", dest="max_timeout_seconds", type=float, help="highest timeout_seconds")

    schedule_commands = commands.add_parser("schedules", help="periodic tasks (table asyncproc_schedules)").add_subparsers(
        dest="schedules_command", required=True, metavar="ACTION"
    )
    add = schedule_commands.add_parser("add", help="add a schedule")
    add.add_argument("name")
    add.add_argument("operation")
    timing = add.add_mutually_exclusive_group(required=True)
    timing.add_argument("--cron", help="five-field cron expression in UTC, or an alias such as @hourly")
    timing.add_argument("--every", type=_integer(1, 366 * 86400), metavar="SECONDS", help="every this many seconds")
    add.add_argument("--data", default="{}", help="the operation's input as a JSON object")
    # The bounds and defaults of POST /process's fields of the same names.
    add.add_argument("--priority", type=_integer(-contract.PRIORITY_LIMIT, contract.PRIORITY_LIMIT),
                     default=contract.DEFAULT_PRIORITY)
    add.add_argument("--max-attempts", type=_integer(contract.MIN_ATTEMPTS, contract.MAX_ATTEMPTS),
                     default=contract.DEFAULT_MAX_ATTEMPTS)
    add.add_argument("--catch-up", choices=("skip", "one"), default="skip", help="after downtime: skip missed runs, or run one")
    schedule_commands.add_parser("list", help="list schedules")
    schedule_commands.add_parser("remove", help="remove a schedule").add_argument("name")

    limit_commands = commands.add_parser("limits", help="per-operation limits (table asyncproc_operation_settings)").add_subparsers(
        dest="limits_command", required=True, metavar="ACTION"
    )
    limit_set = limit_commands.add_parser("set", help="set limits of an operation across every worker")
    limit_set.add_argument("operation")
    # Their bounds are the database's (asyncproc.limits.set_limits asks), so that the CLI, SQL and the claim agree.
    limit_set.add_argument("--max-running", type=_limit(_checked(int, "an integer")), metavar="N|none", help="tasks running at once")
    limit_set.add_argument("--rate", type=_limit(_checked(float, "a number")), metavar="R|none", help="starts per second")
    limit_set.add_argument("--burst", type=_limit(_checked(int, "an integer")), metavar="B|none",
                           help="starts at once (default: the rate, rounded up)")
    limit_set.add_argument("--force", action="store_true",
                           help="set limits of an operation this command does not know (one in another operations module)")
    limit_commands.add_parser("pause", help="start no more tasks of an operation").add_argument("operation")
    limit_commands.add_parser("resume", help="start tasks of an operation again").add_argument("operation")
    limit_commands.add_parser("list", help="limits, running and held tasks per operation")

    commands.add_parser("status", help="the service, the queue and the workers")
    commands.add_parser(
        "psql",
        verbose_flag=False,
        add_help=False,
        help="open psql on the database (the embedded one without DATABASE_URL); "
        "further arguments go to psql, e.g. -c 'TABLE asyncproc_queue'",
        usage="asyncproc psql [PSQL ARGUMENT ...]",
        description="Open psql on the database: DATABASE_URL's, else the embedded one that `asyncproc up` runs "
        "in this directory. Every argument after `psql` goes to psql unchanged, and overrides the connection's "
        "own setting: -U alice, -d otherdb, -h HOST, -v ON_ERROR_STOP=1, -c 'TABLE asyncproc_queue'. "
        "Only a lone --help is asyncproc's; psql's own help is `asyncproc psql -?`.",
    ).add_argument("--help", action="help", help="show this help and exit")

    bench = commands.add_parser("bench", help="start the service and measure it (embedded PostgreSQL without DATABASE_URL)")
    bench.add_argument("--quick", action="store_true", help="run every figure briefly (a few minutes)")
    bench.add_argument("--ledger-rows", type=_integer(1, 1_000_000_000),
                       help="rows in figure 11's ledger (default 10,000,000; 20,000 with --quick)")
    bench.add_argument("--output", metavar="FILE", help="also write the markdown tables to FILE (for the README)")
    bench.add_argument("--dashboard", type=_integer(1, 1_000_000_000), metavar="ROWS", help="instead: time the dashboard's pages with ROWS tasks")
    bench.add_argument("--peers", action="store_true",
                       help="instead: measure asyncproc beside PgQueuer, Oban, Procrastinate and Celery (docs/performance.md)")
    bench.add_argument("--peer", action="append", choices=["procrastinate", "pgqueuer", "oban", "celery"],
                       help="with --peers: only this peer (repeatable; default all)")
    bench.add_argument("--docs", metavar="FILE", help="with --peers: also put the report into FILE's peers section")
    bench.add_argument("--profile", action="store_true",
                       help="instead: where one task's time goes, by process, statement and worker step (docs/performance.md)")
    return parser


def _fill_defaults(args: argparse.Namespace, settings: Settings) -> None:
    defaults = {
        "bind": settings.api.bind,
        "concurrency": settings.worker.concurrency,
        "workers": settings.api.workers,
        "metrics_port": settings.worker.metrics_port,
    }
    for name, value in defaults.items():
        if getattr(args, name, value) is None:
            setattr(args, name, value)


def _duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _task_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a task id") from None


def _operator_action(settings: Settings, args: argparse.Namespace) -> int:
    from asyncproc import service
    from asyncproc.cache import ResultCache

    pool = db.open_pool(settings.db, "asyncproc-cli", 1)
    cache = ResultCache(settings.cache.url, settings.cache.result_ttl_seconds)
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


def _connect_waiting(database_url: str, settings: DatabaseSettings, seconds: float) -> psycopg.Connection:
    """A connection, retried until `seconds` have passed: a database that is still starting answers soon."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return db.connect(database_url, settings, "asyncproc-migrate")
        except psycopg.OperationalError as exc:
            if time.monotonic() >= deadline:
                raise
            log.info("the database does not answer yet (%s); retrying", str(exc).strip().splitlines()[0])
            time.sleep(1)


def _split_psql(argv: list[str]) -> tuple[list[str], list[str]]:
    """asyncproc's words, and psql's: every word after `psql`, options included (-h, -v ...),
    except a lone --help."""
    for index, word in enumerate(argv):
        if not word.startswith("-"):
            if word == "psql" and argv[index + 1:] != ["--help"]:
                return argv[: index + 1], argv[index + 1:]
            break
    return argv, []


# Their log is what they have to say; the other commands answer at once.
SERVING_COMMANDS = ("up", "api", "worker", "bench")


def _log_level(args: argparse.Namespace, settings: Settings) -> str:
    if args.verbose:
        return min(settings.log_level, "INFO", key=logging.getLevelName)
    if args.command in SERVING_COMMANDS:
        return settings.log_level
    return max(settings.log_level, "WARNING", key=logging.getLevelName)


def _psql_environment(database_url: str) -> dict[str, str]:
    """The connection's settings as libpq's variables (PGHOST, PGUSER ...): psql's own
    options override those, where they could not override a connection string.
    A setting no variable carries (keepalives ...) is left out: psql runs without it."""
    variables = {option.keyword.decode(): option.envvar.decode()
                 for option in psycopg.pq.Conninfo.get_defaults() if option.envvar}
    return {variables[name]: value for name, value in conninfo_to_dict(database_url).items() if name in variables}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    own, psql_args = _split_psql(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(own)
    args.psql_args = psql_args
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"asyncproc: configuration error: {exc}", file=sys.stderr)
        return 2
    _fill_defaults(args, settings)
    logs.configure(_log_level(args, settings), settings.log_format)
    try:
        return _run(args, settings)
    except ConfigError as exc:
        print(f"asyncproc: configuration error: {exc}", file=sys.stderr)
        return 2
    except AsyncprocError as exc:
        print(f"asyncproc: {exc.message}", file=sys.stderr)
        return 1
    except (EmbeddedError, MigrationError, KeyCommandError, ScheduleError, LimitsError, AlreadyRunning, supervisor.UpError) as exc:
        print(f"asyncproc: {exc}", file=sys.stderr)
        return 1
    except psycopg.OperationalError as exc:
        print(f"asyncproc: cannot reach the database: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command in ("up", "api", "worker"):
        # Here, before anything forks: a module that cannot be imported is one
        # line, not a traceback from every process.
        load_user_module(settings.operations_module)
    if args.command == "up":
        return supervisor.run(settings, bind=args.bind, concurrency=args.concurrency)
    if args.command == "bench":
        if args.dashboard is not None:
            from asyncproc.bench import dashboard as dashboard_bench

            return dashboard_bench.run(settings, rows=args.dashboard)
        if args.profile:
            from asyncproc.bench import profile

            return profile.run(settings, quick=args.quick)
        if args.peers:
            from asyncproc.bench.peers import compare

            return compare.run(settings, quick=args.quick, only=args.peer, output=args.output, docs=args.docs)
        from asyncproc.bench import run as bench

        return bench.run(settings, quick=args.quick, ledger_rows=args.ledger_rows, output=args.output)
    if args.command == "status":
        from asyncproc import status

        return status.run(settings)
    database_url = locate.database_url(settings)
    if args.command == "psql":
        psql = locate.psql_path()
        os.execve(psql, [str(psql), *args.psql_args], {**os.environ, **_psql_environment(database_url)})
    if args.command == "migrate":
        from asyncproc import migrate

        with _connect_waiting(database_url, settings.db, args.wait) as conn:
            applied = migrate.apply_all(conn, settings.migrations_dir)
        print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else ""))
        return 0
    settings = dataclasses.replace(settings, db=dataclasses.replace(settings.db, url=database_url))
    if args.command in ("retry", "cancel"):
        return _operator_action(settings, args)
    if args.command == "prune":
        from asyncproc import retention

        return retention.run(settings.db, settings.retention, dry_run=args.dry_run, out=sys.stdout)
    if args.command == "api":
        from asyncproc.api import server

        server.run(settings, bind=args.bind, workers=args.workers)
        return 0
    if args.command == "keys":
        from asyncproc import keys

        with db.connect(database_url, settings.db, "asyncproc-keys") as conn:
            quota = Quota(**{name: getattr(args, name, None) for name in keys.QUOTA_FIELDS})
            return keys.run(conn, args.keys_command, getattr(args, "name", None), quota, getattr(args, "dashboard", None))
    if args.command == "schedules":
        from asyncproc import schedules

        load_user_module(settings.operations_module)
        with db.connect(database_url, settings.db, "asyncproc-schedules") as conn:
            return schedules.run(conn, args)
    if args.command == "limits":
        from asyncproc import limits

        load_user_module(settings.operations_module)
        with db.connect(database_url, settings.db, "asyncproc-limits") as conn:
            return limits.run(conn, args)
    if args.command == "worker":
        from worker import main as worker_main

        return worker_main.run(settings, concurrency=args.concurrency, metrics_port=args.metrics_port)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
