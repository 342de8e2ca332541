from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import pytest

from asyncproc.config import SecondsRange, Settings, variable_names
from asyncproc.db import connect_kwargs
from asyncproc.errors import ConfigError
from tests.support import bare_env
from worker.lease import fence_seconds


def test_defaults_need_no_environment():
    settings = Settings.from_env({})
    assert settings.db.url is None
    assert settings.cache.url is None
    assert settings.api.bind == "127.0.0.1:8000"
    assert settings.worker.compute_seconds == SecondsRange(0, 0)
    assert settings.worker.retry_backoff_seconds == 1.0
    assert settings.api.compat == "off"


def test_values_are_read_and_parsed():
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://db/x",
            "REDIS_URL": "redis://r:6379/0",
            "ASYNCPROC_BIND": "0.0.0.0:9000",
            "ASYNCPROC_COMPUTE_SECONDS": "5-10",
            "ASYNCPROC_WORKER_CONCURRENCY": "20",
            "ASYNCPROC_LOG_LEVEL": "debug",
            "ASYNCPROC_COMPAT": "Seed",
        }
    )
    assert settings.db.url == "postgresql://db/x"
    assert settings.cache.url == "redis://r:6379/0"
    assert settings.api.bind == "0.0.0.0:9000"
    assert settings.worker.compute_seconds == SecondsRange(5, 10)
    assert settings.worker.concurrency == 20
    assert settings.log_level == "DEBUG"
    assert settings.api.compat == "seed"


@pytest.mark.parametrize(
    "name,value",
    [
        ("ASYNCPROC_BIND", "8000"),
        ("ASYNCPROC_BIND", "host:99999"),
        ("ASYNCPROC_COMPUTE_SECONDS", "10-5"),
        ("ASYNCPROC_COMPUTE_SECONDS", "soon"),
        ("ASYNCPROC_WORKER_CONCURRENCY", "0"),
        ("ASYNCPROC_WORKER_CONCURRENCY", "ten"),
        ("ASYNCPROC_LOG_LEVEL", "LOUD"),
        ("ASYNCPROC_RETRY_BACKOFF_SECONDS", "-1"),
        ("ASYNCPROC_AUTH", "maybe"),
        ("ASYNCPROC_RATE_LIMIT_PER_SECOND", "0"),
        ("ASYNCPROC_RATE_LIMIT_BURST", "5"),
        ("ASYNCPROC_LOG_FORMAT", "xml"),
        ("ASYNCPROC_WORKER_METRICS_PORT", "0"),
        ("ASYNCPROC_WORKER_METRICS_PORT", "http"),
        ("ASYNCPROC_COMPAT", "fastapi"),
        ("ASYNCPROC_HANDLER_TIMEOUT_SECONDS", "-1"),
        ("ASYNCPROC_HANDLER_TIMEOUT_SECONDS", "a while"),
        ("ASYNCPROC_HANDLER_MEMORY_MB", "8"),
        ("ASYNCPROC_HANDLER_MEMORY_MB", "1.5"),
        ("ASYNCPROC_UNKNOWN_OPERATION_GRACE", "-5"),
        ("ASYNCPROC_RETAIN_COMPLETED", "7"),
        ("ASYNCPROC_RETAIN_FAILED", "a month"),
        ("ASYNCPROC_RETAIN_CANCELLED", "-1d"),
        ("ASYNCPROC_PRUNE_BATCH_SIZE", "0"),
        ("ASYNCPROC_PRUNE_INTERVAL_SECONDS", "0"),
        ("ASYNCPROC_API_NICE", "20"),
        ("ASYNCPROC_API_NICE", "-5"),
    ],
)
def test_a_bad_value_names_its_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_access_control_and_rate_limits_are_off_by_default():
    settings = Settings.from_env({}).api
    assert settings.auth == "off" and not settings.auth_required
    assert settings.rate_limit_per_second is None and settings.rate_limit_burst is None


def test_access_control_and_rate_limits_are_read():
    settings = Settings.from_env({"ASYNCPROC_AUTH": "Required", "ASYNCPROC_RATE_LIMIT_PER_SECOND": "2.5"}).api
    assert settings.auth_required
    assert (settings.rate_limit_per_second, settings.rate_limit_burst) == (2.5, 3)
    burst = Settings.from_env({"ASYNCPROC_RATE_LIMIT_PER_SECOND": "1", "ASYNCPROC_RATE_LIMIT_BURST": "20"})
    assert burst.api.rate_limit_burst == 20


def test_the_cli_reports_a_bad_variable_in_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "asyncproc.cli", "migrate"],
        env=bare_env(ASYNCPROC_WORKER_CONCURRENCY="lots"),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "asyncproc: configuration error: ASYNCPROC_WORKER_CONCURRENCY='lots' is invalid: expected an integer from 1 to 1000"
    ]


def test_the_cli_asks_for_a_database_url_where_one_is_needed():
    result = subprocess.run(
        [sys.executable, "-m", "asyncproc.cli", "worker"], env=bare_env(), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "DATABASE_URL is not set" in result.stderr
    assert "Traceback" not in result.stderr


def test_variable_names_lists_every_variable_read_once():
    names = variable_names()
    assert len(names) == len(set(names))
    assert {"DATABASE_URL", "REDIS_URL", "ASYNCPROC_LOG_FORMAT", "ASYNCPROC_WORKER_METRICS_PORT"} <= set(names)
    # Each listed variable really changes or is checked by from_env: a bad value is refused by name.
    for name in names:
        if name.startswith("ASYNCPROC_") and name not in {"ASYNCPROC_DATA_DIR", "ASYNCPROC_MIGRATIONS_DIR", "ASYNCPROC_OPERATIONS_MODULE"}:
            with pytest.raises(ConfigError, match=name):
                Settings.from_env({name: "not valid!"})


def test_log_format_and_worker_metrics_port_are_read():
    settings = Settings.from_env({"ASYNCPROC_LOG_FORMAT": "JSON", "ASYNCPROC_WORKER_METRICS_PORT": "9100"})
    assert (settings.log_format, settings.worker.metrics_port) == ("json", 9100)
    assert (Settings().log_format, Settings().worker.metrics_port) == ("text", None)


def test_database_timeouts_are_read_and_reach_the_connections():
    settings = Settings.from_env(
        {
            "ASYNCPROC_DB_TCP_USER_TIMEOUT_MS": "4000",
            "ASYNCPROC_DB_KEEPALIVES_IDLE": "2",
            "ASYNCPROC_DB_KEEPALIVES_INTERVAL": "1",
            "ASYNCPROC_DB_KEEPALIVES_COUNT": "2",
            "ASYNCPROC_DB_STATEMENT_TIMEOUT_MS": "0",
            "ASYNCPROC_DB_RESPONSE_TIMEOUT": "2.5",
        }
    ).db
    kwargs = connect_kwargs(settings, "test")
    assert (kwargs["tcp_user_timeout"], kwargs["keepalives_idle"], kwargs["keepalives_interval"], kwargs["keepalives_count"]) == (4000, 2, 1, 2)
    assert settings.statement_timeout_ms == 0
    assert settings.response_timeout == 2.5


@pytest.mark.parametrize(
    "name,value",
    [
        ("ASYNCPROC_DB_TCP_USER_TIMEOUT_MS", "999"),
        ("ASYNCPROC_DB_KEEPALIVES_IDLE", "0"),
        ("ASYNCPROC_DB_KEEPALIVES_COUNT", "x"),
        ("ASYNCPROC_DB_STATEMENT_TIMEOUT_MS", "-1"),
        ("ASYNCPROC_DB_RESPONSE_TIMEOUT", "0.1"),
    ],
)
def test_bad_database_timeouts_are_named(name, value):
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_handler_limits_and_the_unknown_operation_grace_are_read():
    settings = Settings.from_env(
        {
            "ASYNCPROC_HANDLER_TIMEOUT_SECONDS": "30",
            "ASYNCPROC_HANDLER_MEMORY_MB": "512",
            "ASYNCPROC_UNKNOWN_OPERATION_GRACE": "60",
        }
    ).worker
    assert (settings.handler_timeout_seconds, settings.handler_memory_mb) == (30, 512)
    assert settings.unknown_operation_grace_seconds == 60
    default = Settings.from_env({}).worker
    assert (default.handler_timeout_seconds, default.handler_memory_mb) == (600, None)
    assert default.unknown_operation_grace_seconds == 900


def test_retention_defaults_and_durations():
    default = Settings.from_env({}).retention
    assert (default.retain_completed, default.retain_failed, default.retain_cancelled) == (
        timedelta(days=7), timedelta(days=30), timedelta(days=7))
    settings = Settings.from_env(
        {"ASYNCPROC_RETAIN_COMPLETED": "36h", "ASYNCPROC_RETAIN_FAILED": "forever", "ASYNCPROC_RETAIN_CANCELLED": "2w"}
    ).retention
    assert settings.retain_completed == timedelta(hours=36)
    assert settings.retain_failed is None
    assert settings.retain_cancelled == timedelta(days=14)


@pytest.mark.parametrize(
    ("stalled", "heartbeat"),
    [("30", "15"), ("20", "10"), ("5", "3"), ("2", "1")],
)
def test_lease_settings_that_cannot_fence_in_time_are_refused_naming_both(stalled, heartbeat):
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"ASYNCPROC_STALLED_SECONDS": stalled, "ASYNCPROC_HEARTBEAT_SECONDS": heartbeat})
    message = str(refused.value)
    assert "\n" not in message
    assert f"ASYNCPROC_STALLED_SECONDS={stalled}" in message and f"ASYNCPROC_HEARTBEAT_SECONDS={heartbeat}" in message


def test_the_default_lease_settings_are_sound_and_fence_before_any_takeover():
    settings = Settings.from_env({}).worker
    fence = fence_seconds(settings)
    # One missed renewal fits before the fence, and the fence comes a heartbeat before the takeover.
    assert settings.heartbeat_seconds < fence <= settings.stalled_seconds - 1
    assert Settings.from_env({"ASYNCPROC_STALLED_SECONDS": "3", "ASYNCPROC_HEARTBEAT_SECONDS": "1"}).worker.stalled_seconds == 3


def test_the_worker_refuses_unsound_lease_settings_in_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "asyncproc.cli", "worker"],
        env=bare_env(DATABASE_URL="postgresql://nobody@127.0.0.1:1/none",
                     ASYNCPROC_STALLED_SECONDS="10", ASYNCPROC_HEARTBEAT_SECONDS="10"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "ASYNCPROC_STALLED_SECONDS=10" in lines[0] and "ASYNCPROC_HEARTBEAT_SECONDS=10" in lines[0]
