"""Bad input to the CLI is one clear line and exit 2, never a traceback; --help always works."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import bare_env


def _asyncproc(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "asyncproc.cli", *args],
        env=bare_env(**env),
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["up", "--concurrency", "0"], {}, "asyncproc up: error: argument --concurrency: '0' is invalid: expected an integer from 1 to 1000"),
        (["worker", "--metrics-port", "99999"], {}, "asyncproc worker: error: argument --metrics-port: '99999' is invalid: expected an integer from 1 to 65535"),
        (["api", "--workers", "0"], {}, "asyncproc api: error: argument --workers: '0' is invalid: expected an integer from 1 to 64"),
        (["api", "--bind", "8000"], {}, "asyncproc api: error: argument --bind: '8000' is invalid: expected HOST:PORT"),
        (["cancel", "nope"], {}, "asyncproc cancel: error: argument task_id: 'nope' is not a task id"),
        (["status", "--bogus"], {}, "asyncproc: error: unrecognized arguments: --bogus"),
        (["migrate"], {"DATABASE_URL": "not-a-url"}, "asyncproc: configuration error: DATABASE_URL is not a PostgreSQL URL"),
        (["worker"], {"REDIS_URL": "localhost:6379"}, "asyncproc: configuration error: REDIS_URL is not a Redis URL"),
        (["worker"], {"ASYNCPROC_WORKER_CONCURRENCY": "0"}, "asyncproc: configuration error: ASYNCPROC_WORKER_CONCURRENCY='0' is invalid"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, env, message):
    result = _asyncproc(*args, **env)
    assert result.returncode == 2
    assert result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stdout == ""


def test_a_bad_database_url_is_not_echoed():
    result = _asyncproc("migrate", DATABASE_URL="postgres:/user:s3cret@host")
    assert result.returncode == 2 and "s3cret" not in result.stderr


@pytest.mark.parametrize("args", [["--help"], ["up", "--help"], ["worker", "--help"]])
def test_help_works_whatever_the_environment_holds(args):
    result = _asyncproc(*args, ASYNCPROC_WORKER_CONCURRENCY="lots", DATABASE_URL="not-a-url", ASYNCPROC_AUTH="maybe")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: asyncproc")


def test_commands_without_a_database_say_how_to_get_one(tmp_path):
    result = _asyncproc("retry", "--failed", ASYNCPROC_DATA_DIR=str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"asyncproc: configuration error: DATABASE_URL is not set, and no embedded database runs in {tmp_path}: "
        "start one with `asyncproc up` in this directory, or set DATABASE_URL"
    )


@pytest.mark.parametrize("command", ["worker", "api", "up"])
def test_an_operation_with_an_invalid_input_schema_stops_start_up_in_one_line_naming_it(tmp_path, command):
    (tmp_path / "badschema_ops.py").write_text(
        "from asyncproc.operations import operation\n\n"
        "@operation('resize', input_schema={'type': 'object', 'properties': {'width': {'type': 'int'}}})\n"
        "def resize(payload, ctx):\n"
        "    return payload\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "asyncproc.cli", command],
        env=bare_env(ASYNCPROC_OPERATIONS_MODULE="badschema_ops", ASYNCPROC_DATA_DIR=str(tmp_path)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(
        "asyncproc: configuration error: ASYNCPROC_OPERATIONS_MODULE='badschema_ops' cannot be imported: "
        "ValueError: operation 'resize': input_schema is not valid JSON Schema: "
    ), result.stderr
    assert result.stderr.rstrip().endswith("(at properties/width/type)")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
