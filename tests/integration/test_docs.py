"""Every SQL example in the README and docs/ runs, through the real psql, on a migrated database."""

from __future__ import annotations

import re
import shlex
import subprocess
from typing import Iterator

import psycopg
import pytest

from asyncproc import db, migrate
from asyncproc.cli import _parser
from asyncproc.config import Settings, variable_names
from asyncproc.embedded import find_bindir
from tests.conftest import WORKER_OPTIONS
from tests.support import PROJECT_ROOT

DOCUMENTS = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
SNIPPETS = [snippet for path in DOCUMENTS for snippet in re.findall(r"```sql\n(.*?)```", path.read_text(), re.DOTALL)]
# The documented example ids: one failed task to retry, one pending task to cancel.
FAILED_EXAMPLE = "7f1d2c3b-4a5e-4f60-8a71-92b3c4d5e6f7"
PENDING_EXAMPLE = "0c9e8d7f-6a5b-4c3d-9e2f-1a0b9c8d7e6f"


# The role that docs/operating-with-sql.md creates; roles belong to the whole server.
DOCUMENTED_ROLE = "alice"


@pytest.fixture(scope="module")
def readme_database(empty_database) -> Iterator[str]:
    url = empty_database()
    with db.connect(url) as conn:
        migrate.apply_all(conn, Settings().migrations_dir)
        conn.execute("INSERT INTO tasks (task_id, operation) VALUES (%s, 'fail'), (%s, 'sleep')", (FAILED_EXAMPLE, PENDING_EXAMPLE))
    with psycopg.connect(url, autocommit=True, options=WORKER_OPTIONS) as worker:
        worker.execute("UPDATE tasks SET status = 'running', attempts = 1 WHERE task_id = %s", (FAILED_EXAMPLE,))
        worker.execute("UPDATE tasks SET status = 'failed', error_message = 'boom' WHERE task_id = %s", (FAILED_EXAMPLE,))
    with db.connect(url) as conn:
        conn.execute(f"DROP ROLE IF EXISTS {DOCUMENTED_ROLE}")
    yield url
    with db.connect(url) as conn:
        conn.execute(f"DROP ROLE IF EXISTS {DOCUMENTED_ROLE}")


def test_the_docs_document_every_operator_function_and_view():
    text = "\n".join(SNIPPETS)
    for name in ("asyncproc_retry(", "asyncproc_retry_failed(", "asyncproc_cancel(", "asyncproc_status_counts",
                 "asyncproc_throughput_per_minute", "asyncproc_throughput_per_hour", "asyncproc_latency_last_hour",
                 "asyncproc_recent_failures", "asyncproc_stuck_tasks", "asyncproc_queue"):
        assert name in text, name


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.strip().splitlines()[0][:50] for s in SNIPPETS])
def test_documented_sql_runs_in_psql(readme_database, snippet):
    result = subprocess.run(
        [str(find_bindir() / "psql"), readme_database, "-X", "-v", "ON_ERROR_STOP=1"],
        input=snippet,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_the_readme_is_short_and_every_local_link_resolves():
    assert len((PROJECT_ROOT / "README.md").read_text().splitlines()) <= 250
    for path in DOCUMENTS:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
            assert (path.parent / target).exists(), f"{path.name} links to a missing {target}"


def _documented_asyncproc_commands() -> list[list[str]]:
    """Every `asyncproc ...` command in the bash blocks, as words, without VAR=value prefixes."""
    found = []
    for path in DOCUMENTS:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.DOTALL):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.removeprefix("$ ").split(" #")[0]
                for piece in re.split(r"&&|\|\||;|\||&$", line):
                    words = shlex.split(piece)
                    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                        words.pop(0)
                    if words and words[0].endswith("asyncproc"):
                        found.append(words)
    return found


def test_every_documented_asyncproc_command_parses_with_its_variables():
    commands = _documented_asyncproc_commands()
    assert len(commands) > 10
    for words in commands:
        args, extra = _parser().parse_known_args(words[1:])
        assert not extra or args.command == "psql", words
    for path in DOCUMENTS:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.DOTALL):
            for name, value in re.findall(r"\b((?:ASYNCPROC_[A-Z_]+|DATABASE_URL|REDIS_URL))=(\S+)", block):
                if name in variable_names():
                    Settings.from_env({name: value.strip("'\"")})
