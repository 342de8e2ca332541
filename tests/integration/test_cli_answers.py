"""The CLI's answers as a person reads them, from the real command against a real database.

Each command runs as a subprocess, in a scratch directory where no `asyncproc up` runs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.support import bare_env, connect, migrated_database


@pytest.fixture(scope="module")
def fresh_url(empty_database) -> str:
    return migrated_database(empty_database)


def asyncproc(directory: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "asyncproc.cli", *args],
        env=bare_env(ASYNCPROC_DATA_DIR=str(directory), **env),
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=60,
    )


def pending_task(url: str, age_seconds: int = 0) -> str:
    with connect(url) as conn:
        return str(conn.execute(
            "INSERT INTO tasks (operation, payload, created_at, scheduled_at)"
            " VALUES ('compute', '{\"n\": 1}', now() - make_interval(secs => %(age)s), now() - make_interval(secs => %(age)s))"
            " RETURNING task_id",
            {"age": age_seconds},
        ).fetchone()["task_id"])


def test_retry_and_cancel_answer_alone_and_log_only_with_verbose(fresh_url, tmp_path):
    task_id = pending_task(fresh_url)
    cancelled = asyncproc(tmp_path, "cancel", task_id, DATABASE_URL=fresh_url)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stderr == ""
    assert json.loads(cancelled.stdout)["status"] == "cancelled"
    retried = asyncproc(tmp_path, "retry", task_id, DATABASE_URL=fresh_url)
    assert retried.returncode == 0, retried.stderr
    assert retried.stderr == ""
    assert json.loads(retried.stdout)["status"] == "pending"
    for args in (["-v", "cancel", task_id], ["retry", task_id, "--verbose"]):
        verbose = asyncproc(tmp_path, *args, DATABASE_URL=fresh_url)
        assert verbose.returncode == 0, verbose.stderr
        assert " INFO " in verbose.stderr and "results cache is off" in verbose.stderr
        assert json.loads(verbose.stdout)["task_id"] == task_id


def test_status_with_nothing_running_says_not_running(tmp_path):
    result = asyncproc(tmp_path, "status")
    assert result.returncode == 3
    assert result.stderr == ""
    service, database = result.stdout.splitlines()
    assert service == f"service:  no `asyncproc up` runs with {tmp_path}"
    assert database.startswith(
        f"database: not running (DATABASE_URL is not set, and no embedded database runs in {tmp_path}: "
    ), database


def test_empty_lists_say_so(empty_database, tmp_path):
    url = migrated_database(empty_database)
    answers = {
        ("keys", "list"): "no API keys: `asyncproc keys create NAME` makes one",
        ("schedules", "list"): "no schedules: `asyncproc schedules add` makes one",
        ("limits", "list"): "no per-operation limits: `asyncproc limits set` sets some",
    }
    for args, answer in answers.items():
        result = asyncproc(tmp_path, *args, DATABASE_URL=url)
        assert (result.returncode, result.stdout, result.stderr) == (0, answer + "\n", ""), args


def test_durations_read_as_a_person_says_them(fresh_url, tmp_path):
    task_id = pending_task(fresh_url, age_seconds=90)
    status = asyncproc(tmp_path, "status", DATABASE_URL=fresh_url)
    assert status.returncode == 0, status.stderr
    assert re.search(r"oldest waiting 1 min 3\d s$", status.stdout, re.MULTILINE), status.stdout
    with connect(fresh_url) as conn:
        conn.execute("SELECT asyncproc_cancel(%s)", (task_id,))
    pruned = asyncproc(tmp_path, "prune", "--dry-run", DATABASE_URL=fresh_url)
    assert pruned.returncode == 0, pruned.stderr
    assert "compute\tcancelled\tkeep 7 days\t0 due" in pruned.stdout.splitlines(), pruned.stdout
    assert "0:00:00" not in pruned.stdout
    added = asyncproc(tmp_path, "schedules", "add", "hourly-sleep", "sleep", "--every", "3600", DATABASE_URL=fresh_url)
    assert added.returncode == 0, added.stderr
    listed = asyncproc(tmp_path, "schedules", "list", DATABASE_URL=fresh_url)
    assert listed.stdout.startswith("hourly-sleep\tevery 1 h\tsleep\tenabled\tnext "), listed.stdout


def test_psql_passes_every_argument_through(fresh_url, tmp_path):
    def psql(*args: str) -> subprocess.CompletedProcess:
        return asyncproc(tmp_path, "psql", "-X", "-A", "-t", *args, DATABASE_URL=fresh_url)

    assert psql("-c", "SELECT current_user").stdout == "postgres\n"
    role = f"nobody_{uuid.uuid4().hex[:8]}"
    as_role = psql("-U", role, "-c", "SELECT 1")
    assert as_role.returncode != 0 and f'role "{role}" does not exist' in as_role.stderr, as_role.stderr
    host = conninfo_to_dict(fresh_url)["host"]
    flags = psql("-h", host, "-v", "ON_ERROR_STOP=1", "-d", "postgres", "-c", "SELECT current_database()")
    assert (flags.returncode, flags.stdout) == (0, "postgres\n"), flags.stderr
    helped = asyncproc(tmp_path, "psql", "--help")
    assert helped.returncode == 0
    assert "Every argument after `psql` goes to psql unchanged" in " ".join(helped.stdout.split()), helped.stdout


def test_limits_set_refuses_an_unknown_operation_unless_forced(fresh_url, tmp_path):
    refused = asyncproc(tmp_path, "limits", "set", "resize", "--max-running", "2", DATABASE_URL=fresh_url)
    assert refused.returncode == 1
    assert refused.stderr == (
        "asyncproc: unknown operation 'resize'; known: compute, fail, sleep "
        "(a worker with another ASYNCPROC_OPERATIONS_MODULE may know it: --force sets its limits anyway)\n"
    )
    assert refused.stdout == ""
    forced = asyncproc(tmp_path, "limits", "set", "resize", "--max-running", "2", "--force", DATABASE_URL=fresh_url)
    assert (forced.returncode, forced.stdout) == (0, "limits of 'resize' set\n"), forced.stderr
    known = asyncproc(tmp_path, "limits", "set", "sleep", "--max-running", "2", DATABASE_URL=fresh_url)
    assert (known.returncode, known.stdout) == (0, "limits of 'sleep' set\n"), known.stderr


def test_keys_list_shows_each_keys_dashboard_role(fresh_url, tmp_path):
    for name, role in (("plain", None), ("viewer", "read"), ("operator", "operate")):
        created = asyncproc(tmp_path, "keys", "create", name, *(["--dashboard", role] if role else []), DATABASE_URL=fresh_url)
        assert created.returncode == 0, created.stderr
    listed = asyncproc(tmp_path, "keys", "list", DATABASE_URL=fresh_url)
    roles = {line.split("\t")[0]: line.split("\t")[3] for line in listed.stdout.splitlines()}
    assert roles == {"plain": "no dashboard", "viewer": "dashboard read", "operator": "dashboard operate"}
