from __future__ import annotations

import subprocess
import sys

import pytest

from asyncproc.config import SecondsRange, Settings
from asyncproc.db import connect_kwargs
from asyncproc.errors import ConfigError


def test_defaults_need_no_environment():
    settings = Settings.from_env({})
    assert settings.database_url is None
    assert settings.redis_url is None
    assert settings.bind == "127.0.0.1:8000"
    assert settings.compute_seconds == SecondsRange(0, 0)
    assert settings.retry_backoff_seconds == 1.0


def test_values_are_read_and_parsed():
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://db/x",
            "REDIS_URL": "redis://r:6379/0",
            "ASYNCPROC_BIND": "0.0.0.0:9000",
            "ASYNCPROC_COMPUTE_SECONDS": "5-10",
            "ASYNCPROC_WORKER_CONCURRENCY": "20",
            "ASYNCPROC_LOG_LEVEL": "debug",
        }
    )
    assert settings.database_url == "postgresql://db/x"
    assert settings.bind == "0.0.0.0:9000"
    assert settings.compute_seconds == SecondsRange(5, 10)
    assert settings.worker_concurrency == 20
    assert settings.log_level == "DEBUG"


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
    ],
)
def test_a_bad_value_names_its_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_the_cli_reports_a_bad_variable_in_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "asyncproc.cli", "migrate"],
        env={"ASYNCPROC_WORKER_CONCURRENCY": "lots", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "asyncproc: configuration error: ASYNCPROC_WORKER_CONCURRENCY='lots' is invalid: expected an integer from 1 to 1000"
    ]


def test_the_cli_asks_for_a_database_url_where_one_is_needed():
    result = subprocess.run(
        [sys.executable, "-m", "asyncproc.cli", "worker"], env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "DATABASE_URL is not set" in result.stderr
    assert "Traceback" not in result.stderr


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
    )
    kwargs = connect_kwargs(settings, "test")
    assert (kwargs["tcp_user_timeout"], kwargs["keepalives_idle"], kwargs["keepalives_interval"], kwargs["keepalives_count"]) == (4000, 2, 1, 2)
    assert settings.db_statement_timeout_ms == 0
    assert settings.db_response_timeout == 2.5


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
