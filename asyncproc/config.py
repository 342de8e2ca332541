"""Settings.from_env(): the only place that reads os.environ.

Every variable is validated at start-up; a bad value raises ConfigError naming
the variable, which the CLI prints as one line instead of a traceback.
Settings holds one frozen group per component (database, cache, API, worker,
retention, callbacks), so that each component is handed only what it reads.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from dataclasses import dataclass, field
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import Callable, Mapping

import psycopg
from psycopg import conninfo

from asyncproc.errors import ConfigError
from asyncproc.webhooks import AllowList

# The package's own copy (setup.cfg maps migrations/ onto asyncproc.migrations),
# so that every install finds it wherever the command runs.
INSTALLED_MIGRATIONS = Path(str(resources.files("asyncproc.migrations")))


@dataclass(frozen=True)
class SecondsRange:
    """A fixed duration ("3") or a uniform random one ("5-10")."""

    low: float
    high: float


@dataclass(frozen=True)
class DatabaseSettings:
    """How every component connects to PostgreSQL, and the server settings of the API's and the
    worker's connections (asyncproc/db.py)."""

    url: str | None = None
    pool_size: int = 8
    connect_timeout: float = 5.0
    # TCP keepalives and the TCP user timeout notice a silently cut connection.
    keepalives_idle: int = 10
    keepalives_interval: int = 5
    keepalives_count: int = 3
    tcp_user_timeout_ms: int = 15000
    # The server cancels an API query running longer than this (0: never).
    statement_timeout_ms: int = 10000
    # A worker's database round trip unanswered this long means its connections are dead.
    response_timeout: float = 10.0
    # A worker statement waits this long at most for a row lock, and runs this long at most.
    worker_lock_timeout_ms: int = 5000
    worker_statement_timeout_ms: int = 60000

    @classmethod
    def _read(cls, reader: "_Reader") -> "DatabaseSettings":
        default = cls()
        return cls(
            url=reader.database_url("DATABASE_URL"),
            pool_size=reader.integer("ASYNCPROC_DB_POOL_SIZE", default.pool_size, 1, 500),
            connect_timeout=reader.number("ASYNCPROC_DB_CONNECT_TIMEOUT", default.connect_timeout, 1, 300),
            keepalives_idle=reader.integer("ASYNCPROC_DB_KEEPALIVES_IDLE", default.keepalives_idle, 1, 3600),
            keepalives_interval=reader.integer(
                "ASYNCPROC_DB_KEEPALIVES_INTERVAL", default.keepalives_interval, 1, 600
            ),
            keepalives_count=reader.integer("ASYNCPROC_DB_KEEPALIVES_COUNT", default.keepalives_count, 1, 100),
            tcp_user_timeout_ms=reader.integer(
                "ASYNCPROC_DB_TCP_USER_TIMEOUT_MS", default.tcp_user_timeout_ms, 1000, 600_000
            ),
            statement_timeout_ms=reader.integer(
                "ASYNCPROC_DB_STATEMENT_TIMEOUT_MS", default.statement_timeout_ms, 0, 3_600_000
            ),
            response_timeout=reader.number("ASYNCPROC_DB_RESPONSE_TIMEOUT", default.response_timeout, 0.5, 600),
            worker_lock_timeout_ms=reader.integer(
                "ASYNCPROC_WORKER_LOCK_TIMEOUT_MS", default.worker_lock_timeout_ms, 1, 600_000
            ),
            worker_statement_timeout_ms=reader.integer(
                "ASYNCPROC_WORKER_STATEMENT_TIMEOUT_MS", default.worker_statement_timeout_ms, 1000, 3_600_000
            ),
        )


@dataclass(frozen=True)
class CacheSettings:
    """The Redis result cache the API and the worker share (asyncproc/cache.py)."""

    url: str | None = None
    result_ttl_seconds: int = 3600

    @classmethod
    def _read(cls, reader: "_Reader") -> "CacheSettings":
        default = cls()
        return cls(
            url=reader.redis_url("REDIS_URL"),
            result_ttl_seconds=reader.integer(
                "ASYNCPROC_RESULT_TTL_SECONDS", default.result_ttl_seconds, 1, 30 * 86400
            ),
        )


@dataclass(frozen=True)
class ApiSettings:
    """The HTTP API: its processes, its limits on clients, and access control."""

    bind: str = "127.0.0.1:8000"
    workers: int = 2
    threads: int = 8
    # The API's CPU priority (nice) below the workers': on a host it shares with
    # workers, it yields the cores to them under load (docs/deployment.md).
    nice: int = 10
    max_body_bytes: int = 1024 * 1024
    auth: str = "off"
    rate_limit_per_second: float | None = None
    rate_limit_burst: int | None = None
    # Per client address, taken before authentication (ASYNCPROC_AUTH=required).
    address_rate_limit_per_second: float | None = None
    address_rate_limit_burst: int | None = None
    # "seed": the HTTP layer answers in the seed's contract (asyncproc/api/compat.py).
    compat: str = "off"
    # Waiting clients (?wait, /events) parked on each API process's event loop.
    max_waiters: int = 5000
    max_waiters_per_key: int = 500
    stream_max_seconds: float = 300.0
    # Slow clients: headers and body must arrive within these; connections per address.
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 30.0
    max_connections_per_address: int = 2000
    # Addresses or networks (as networks: 10.0.0.0/8, 192.0.2.5/32) whose X-Forwarded-For and
    # X-Forwarded-Proto are believed, by us and by gunicorn.
    trusted_proxies: tuple[str, ...] = ()
    # /metrics needs this bearer token when set; without it, it is open only when auth is off.
    metrics_token: str | None = None
    # A dashboard session ends this long after its last request, and this long after sign-in.
    dashboard_idle_seconds: float = 1800.0
    dashboard_session_max_seconds: float = 43200.0

    @property
    def auth_required(self) -> bool:
        return self.auth == "required"

    @classmethod
    def _read(cls, reader: "_Reader") -> "ApiSettings":
        default = cls()
        return cls(
            bind=reader.bind("ASYNCPROC_BIND", default.bind),
            workers=reader.integer("ASYNCPROC_API_WORKERS", default.workers, 1, 64),
            threads=reader.integer("ASYNCPROC_API_THREADS", default.threads, 1, 256),
            nice=reader.integer("ASYNCPROC_API_NICE", default.nice, 0, 19),
            max_body_bytes=reader.integer("ASYNCPROC_MAX_BODY_BYTES", default.max_body_bytes, 1024, 1 << 30),
            auth=reader.choice("ASYNCPROC_AUTH", default.auth.upper(), ("OFF", "REQUIRED")).lower(),
            **reader.rate_limit("rate_limit", "ASYNCPROC_RATE_LIMIT_PER_SECOND", "ASYNCPROC_RATE_LIMIT_BURST"),
            **reader.rate_limit(
                "address_rate_limit",
                "ASYNCPROC_ADDRESS_RATE_LIMIT_PER_SECOND",
                "ASYNCPROC_ADDRESS_RATE_LIMIT_BURST",
            ),
            compat=reader.choice("ASYNCPROC_COMPAT", default.compat.upper(), ("OFF", "SEED")).lower(),
            max_waiters=reader.integer("ASYNCPROC_MAX_WAITERS", default.max_waiters, 0, 1_000_000),
            max_waiters_per_key=reader.integer(
                "ASYNCPROC_MAX_WAITERS_PER_KEY", default.max_waiters_per_key, 0, 1_000_000
            ),
            stream_max_seconds=reader.number("ASYNCPROC_STREAM_MAX_SECONDS", default.stream_max_seconds, 1, 86400),
            header_timeout_seconds=reader.number(
                "ASYNCPROC_HEADER_TIMEOUT_SECONDS", default.header_timeout_seconds, 0.1, 3600
            ),
            body_timeout_seconds=reader.number(
                "ASYNCPROC_BODY_TIMEOUT_SECONDS", default.body_timeout_seconds, 0.1, 3600
            ),
            max_connections_per_address=reader.integer(
                "ASYNCPROC_MAX_CONNECTIONS_PER_ADDRESS", default.max_connections_per_address, 1, 1_000_000
            ),
            trusted_proxies=reader.networks("ASYNCPROC_TRUSTED_PROXIES"),
            metrics_token=reader.secret("ASYNCPROC_METRICS_TOKEN"),
            dashboard_idle_seconds=reader.number(
                "ASYNCPROC_DASHBOARD_IDLE_SECONDS", default.dashboard_idle_seconds, 1, 30 * 86400
            ),
            dashboard_session_max_seconds=reader.number(
                "ASYNCPROC_DASHBOARD_SESSION_MAX_SECONDS", default.dashboard_session_max_seconds, 1, 30 * 86400
            ),
        )


@dataclass(frozen=True)
class WorkerSettings:
    """The worker: its job loop, lease, handlers and scheduler."""

    concurrency: int = 10
    poll_seconds: float = 1.0
    shutdown_grace_seconds: float = 30.0
    stalled_seconds: float = 30.0
    heartbeat_seconds: float = 10.0
    retry_backoff_seconds: float = 1.0
    retry_backoff_max_seconds: float = 300.0
    progress_interval_seconds: float = 1.0
    compute_seconds: SecondsRange = field(default_factory=lambda: SecondsRange(0.0, 0.0))
    metrics_port: int | None = None
    # A handler's time limit when neither the task nor its operation sets one (0: none).
    handler_timeout_seconds: float = 600.0
    # The memory a handler may allocate in its child process; None: no limit.
    handler_memory_mb: int | None = None
    # How long a task whose operation no worker knows waits for one that does.
    unknown_operation_grace_seconds: float = 900.0
    scheduler_poll_seconds: float = 1.0
    # A scheduled occurrence later than this is skipped (catch_up 'skip').
    schedule_misfire_seconds: float = 60.0

    @classmethod
    def _read(cls, reader: "_Reader") -> "WorkerSettings":
        default = cls()
        return cls(
            concurrency=reader.integer("ASYNCPROC_WORKER_CONCURRENCY", default.concurrency, 1, 1000),
            poll_seconds=reader.number("ASYNCPROC_WORKER_POLL_SECONDS", default.poll_seconds, 0.05, 60),
            shutdown_grace_seconds=reader.number(
                "ASYNCPROC_SHUTDOWN_GRACE_SECONDS", default.shutdown_grace_seconds, 0, 86400
            ),
            stalled_seconds=reader.number("ASYNCPROC_STALLED_SECONDS", default.stalled_seconds, 1, 86400),
            heartbeat_seconds=reader.number("ASYNCPROC_HEARTBEAT_SECONDS", default.heartbeat_seconds, 0.1, 3600),
            retry_backoff_seconds=reader.number(
                "ASYNCPROC_RETRY_BACKOFF_SECONDS", default.retry_backoff_seconds, 0, 3600
            ),
            retry_backoff_max_seconds=reader.number(
                "ASYNCPROC_RETRY_BACKOFF_MAX_SECONDS", default.retry_backoff_max_seconds, 0, 86400
            ),
            progress_interval_seconds=reader.number(
                "ASYNCPROC_PROGRESS_INTERVAL_SECONDS", default.progress_interval_seconds, 0, 3600
            ),
            compute_seconds=reader.seconds_range("ASYNCPROC_COMPUTE_SECONDS", default.compute_seconds),
            metrics_port=reader.optional_integer("ASYNCPROC_WORKER_METRICS_PORT", 1, 65535),
            handler_timeout_seconds=reader.number(
                "ASYNCPROC_HANDLER_TIMEOUT_SECONDS", default.handler_timeout_seconds, 0, 7 * 86400
            ),
            handler_memory_mb=reader.optional_integer("ASYNCPROC_HANDLER_MEMORY_MB", 16, 1 << 20),
            unknown_operation_grace_seconds=reader.number(
                "ASYNCPROC_UNKNOWN_OPERATION_GRACE", default.unknown_operation_grace_seconds, 0, 30 * 86400
            ),
            scheduler_poll_seconds=reader.number(
                "ASYNCPROC_SCHEDULER_POLL_SECONDS", default.scheduler_poll_seconds, 0.05, 60
            ),
            schedule_misfire_seconds=reader.number(
                "ASYNCPROC_SCHEDULE_MISFIRE_SECONDS", default.schedule_misfire_seconds, 0, 86400
            ),
        )


@dataclass(frozen=True)
class RetentionSettings:
    """How long finished tasks stay in `tasks`; None keeps them for ever (docs/retention.md)."""

    retain_completed: timedelta | None = timedelta(days=7)
    retain_failed: timedelta | None = timedelta(days=30)
    retain_cancelled: timedelta | None = timedelta(days=7)
    prune_interval_seconds: float = 60.0
    prune_batch_size: int = 1000

    @classmethod
    def _read(cls, reader: "_Reader") -> "RetentionSettings":
        default = cls()
        return cls(
            retain_completed=reader.retention("ASYNCPROC_RETAIN_COMPLETED", default.retain_completed),
            retain_failed=reader.retention("ASYNCPROC_RETAIN_FAILED", default.retain_failed),
            retain_cancelled=reader.retention("ASYNCPROC_RETAIN_CANCELLED", default.retain_cancelled),
            prune_interval_seconds=reader.number(
                "ASYNCPROC_PRUNE_INTERVAL_SECONDS", default.prune_interval_seconds, 1, 86400
            ),
            prune_batch_size=reader.integer("ASYNCPROC_PRUNE_BATCH_SIZE", default.prune_batch_size, 1, 100_000),
        )


@dataclass(frozen=True)
class CallbackSettings:
    """Webhook delivery (worker/callbacks.py), and the API's checks of a callback URL."""

    allow: AllowList = field(default_factory=AllowList)
    # Signs the callbacks of tasks that no API key created (access control off, psql).
    secret: str | None = None
    # Bounds a whole delivery, from resolving the host to the last byte read;
    # the delivery's lease is this plus worker/callbacks.py's LEASE_MARGIN_SECONDS.
    timeout_seconds: float = 10.0
    # The first retry of a failed delivery waits this long, doubling up to an hour.
    backoff_seconds: float = 10.0
    # A delivery still failing this long after the task finished is given up.
    max_age_seconds: float = 86400.0
    poll_seconds: float = 1.0

    @classmethod
    def _read(cls, reader: "_Reader") -> "CallbackSettings":
        default = cls()
        return cls(
            allow=reader.allow_list("ASYNCPROC_CALLBACK_ALLOW"),
            secret=reader.secret("ASYNCPROC_CALLBACK_SECRET"),
            timeout_seconds=reader.number("ASYNCPROC_CALLBACK_TIMEOUT_SECONDS", default.timeout_seconds, 0.1, 300),
            backoff_seconds=reader.number(
                "ASYNCPROC_CALLBACK_BACKOFF_SECONDS", default.backoff_seconds, 0.01, 3600
            ),
            max_age_seconds=reader.number(
                "ASYNCPROC_CALLBACK_MAX_AGE_SECONDS", default.max_age_seconds, 1, 7 * 86400
            ),
            poll_seconds=reader.number("ASYNCPROC_CALLBACK_POLL_SECONDS", default.poll_seconds, 0.05, 60),
        )


@dataclass(frozen=True)
class Settings:
    """Every group, read together; each component is handed only the groups it uses."""

    db: DatabaseSettings = field(default_factory=DatabaseSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    callbacks: CallbackSettings = field(default_factory=CallbackSettings)
    log_level: str = "INFO"
    log_format: str = "text"
    # Relative to where a command runs, so that every command run in the
    # directory of an `asyncproc up` finds its embedded database.
    data_dir: Path = Path(".asyncproc")
    # The schema the commands that migrate apply (asyncproc migrate, asyncproc up).
    migrations_dir: Path = INSTALLED_MIGRATIONS
    operations_module: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        settings = cls._read(_Reader(env))
        _check_fencing(settings.worker)
        return settings

    @classmethod
    def _read(cls, reader: "_Reader") -> "Settings":
        default = cls()
        return cls(
            db=DatabaseSettings._read(reader),
            cache=CacheSettings._read(reader),
            api=ApiSettings._read(reader),
            worker=WorkerSettings._read(reader),
            retention=RetentionSettings._read(reader),
            callbacks=CallbackSettings._read(reader),
            log_level=reader.choice(
                "ASYNCPROC_LOG_LEVEL", default.log_level, ("DEBUG", "INFO", "WARNING", "ERROR")
            ),
            log_format=reader.choice("ASYNCPROC_LOG_FORMAT", default.log_format.upper(), ("JSON", "TEXT")).lower(),
            data_dir=Path(reader.text("ASYNCPROC_DATA_DIR", str(default.data_dir))).resolve(),
            migrations_dir=Path(reader.text("ASYNCPROC_MIGRATIONS_DIR", str(default.migrations_dir))),
            operations_module=reader.text("ASYNCPROC_OPERATIONS_MODULE", None),
        )


def _check_fencing(worker: WorkerSettings) -> None:
    """Refuse lease settings under which a worker could still run a task that another worker has taken.

    A worker renews its lease every HEARTBEAT seconds and stops its handlers
    STALLED - HEARTBEAT seconds after its last renewal began; the sweep takes
    its tasks STALLED seconds after it. The fence must allow one missed
    renewal (STALLED - HEARTBEAT > HEARTBEAT) and leave a second at least for
    the kill (worker/lease.py).
    """
    stalled, heartbeat = worker.stalled_seconds, worker.heartbeat_seconds
    if stalled < 2 * heartbeat + 1:
        raise ConfigError(
            f"ASYNCPROC_STALLED_SECONDS={stalled:g} and ASYNCPROC_HEARTBEAT_SECONDS={heartbeat:g} are unsound:"
            f" a worker fences itself STALLED - HEARTBEAT seconds after its last lease renewal, which must leave"
            f" a missed renewal and a second before another worker may take its tasks;"
            f" need ASYNCPROC_STALLED_SECONDS >= 2 x ASYNCPROC_HEARTBEAT_SECONDS + 1 ({2 * heartbeat + 1:g})"
        )


def parse_integer(value: str, low: int, high: int) -> int:
    """The checks behind both a variable and a command-line flag; ValueError when out of range."""
    number = int(value)
    if not low <= number <= high:
        raise ValueError
    return number


def parse_bind(value: str) -> str:
    match = re.fullmatch(r"(.+):(\d{1,5})", value)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ValueError
    return value


BIND_EXPECTED = "HOST:PORT, for example 127.0.0.1:8000"


def integer_expected(low: int, high: int) -> str:
    return f"an integer from {low} to {high}"


def variable_names() -> tuple[str, ...]:
    """Every environment variable from_env reads, taken from a dry run so the list cannot drift.

    The Docker files and .env.example are checked against it.
    """
    reader = _Reader({})
    Settings._read(reader)
    return tuple(reader.names)


class _Reader:
    def __init__(self, env: Mapping[str, str]):
        self._env = env
        self.names: list[str] = []

    def _raw(self, name: str) -> str | None:
        self.names.append(name)
        value = self._env.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def text(self, name: str, default: str | None) -> str | None:
        value = self._raw(name)
        return default if value is None else value

    def _parse(self, name: str, default, parse: Callable[[str], object], expected: str):
        value = self._raw(name)
        if value is None:
            return default
        try:
            return parse(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r} is invalid: expected {expected}") from None

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        return self._parse(name, default, lambda value: parse_integer(value, low, high), integer_expected(low, high))

    def optional_integer(self, name: str, low: int, high: int) -> int | None:
        return self.integer(name, None, low, high)

    def number(self, name: str, default: float, low: float, high: float) -> float:
        def parse(value: str) -> float:
            number = float(value)
            if not low <= number <= high:
                raise ValueError
            return number

        return self._parse(name, default, parse, f"a number from {low:g} to {high:g}")

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        def parse(value: str) -> str:
            if value.upper() not in choices:
                raise ValueError
            return value.upper()

        return self._parse(name, default, parse, "one of " + ", ".join(choices))

    def bind(self, name: str, default: str) -> str:
        return self._parse(name, default, parse_bind, BIND_EXPECTED)

    def database_url(self, name: str) -> str | None:
        value = self._raw(name)
        if value is not None:
            try:
                conninfo.conninfo_to_dict(value)
            except psycopg.ProgrammingError:
                # The value is not echoed: it may hold a password.
                raise ConfigError(
                    f"{name} is not a PostgreSQL URL: expected postgresql://USER:PASSWORD@HOST:5432/DBNAME"
                ) from None
        return value

    def redis_url(self, name: str) -> str | None:
        value = self._raw(name)
        if value is not None and not re.match(r"(redis|rediss|unix)://", value):
            raise ConfigError(f"{name} is not a Redis URL: expected redis://HOST:6379/0")
        return value

    def rate_limit(self, field: str, rate_name: str, burst_name: str) -> dict[str, float | int | None]:
        """Unset: no limit. The burst defaults to one second's worth of requests."""
        if self._raw(rate_name) is None:
            if self._raw(burst_name) is not None:
                raise ConfigError(f"{burst_name} is set but {rate_name} is not")
            return {f"{field}_per_second": None, f"{field}_burst": None}
        rate = self.number(rate_name, 0.0, 0.001, 1_000_000)
        burst = self.integer(burst_name, max(1, math.ceil(rate)), 1, 1_000_000)
        return {f"{field}_per_second": rate, f"{field}_burst": burst}

    def secret(self, name: str) -> str | None:
        def parse(value: str) -> str:
            if not re.fullmatch(r"[\x21-\x7e]{16,255}", value):
                raise ValueError
            return value

        return self._parse(name, None, parse, "16-255 printable ASCII characters without spaces")

    def networks(self, name: str) -> tuple[str, ...]:
        def parse(value: str) -> tuple[str, ...]:
            # Normalised, because gunicorn refuses a network with host bits set (10.0.0.1/8).
            return tuple(
                str(ipaddress.ip_network(item.strip(), strict=False)) for item in value.split(",") if item.strip()
            )

        return self._parse(name, (), parse, "comma-separated addresses or networks, for example 10.0.0.0/8")

    def allow_list(self, name: str) -> AllowList:
        return self._parse(name, AllowList(), AllowList.parse, "comma-separated host names, IP networks or *")

    def seconds_range(self, name: str, default: SecondsRange) -> SecondsRange:
        def parse(value: str) -> SecondsRange:
            low, _, high = value.partition("-")
            first = float(low)
            second = float(high) if high else first
            if not 0 <= first <= second <= 3600:
                raise ValueError
            return SecondsRange(first, second)

        return self._parse(name, default, parse, "seconds, or a range such as 5-10")

    def retention(self, name: str, default: timedelta | None) -> timedelta | None:
        """A duration such as 90s, 30m, 12h, 7d or 2w, or `forever` (None)."""
        value = self._raw(name)
        if value is None:
            return default
        if value.lower() == "forever":
            return None
        try:
            return parse_duration(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r} is invalid: expected a duration such as 12h, 7d or 2w, or forever") from None


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """30s, 15m, 1h, 2d, 1w, 1.5h; ValueError otherwise."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", text.strip().lower())
    if not match:
        raise ValueError(f"{text!r} is not a duration such as 30m, 1h or 2d")
    return timedelta(seconds=float(match.group(1)) * _DURATION_UNITS[match.group(2)])
