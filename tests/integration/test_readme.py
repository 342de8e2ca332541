"""Every SQL example in the README runs, through the real psql, on a migrated database."""

from __future__ import annotations

import re
import subprocess

import pytest

from asyncproc import db, migrate
from asyncproc.config import PROJECT_ROOT, Settings
from asyncproc.embedded import find_bindir

SNIPPETS = re.findall(r"```sql\n(.*?)```", (PROJECT_ROOT / "README.md").read_text(), re.DOTALL)


@pytest.fixture(scope="module")
def readme_database(empty_database) -> str:
    url = empty_database()
    with db.connect(url) as conn:
        migrate.apply_all(conn, Settings().migrations_dir)
    return url


def test_the_readme_has_sql_examples():
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.strip().splitlines()[0][:50] for s in SNIPPETS])
def test_readme_sql_runs_in_psql(readme_database, snippet):
    result = subprocess.run(
        [str(find_bindir() / "psql"), readme_database, "-X", "-v", "ON_ERROR_STOP=1"],
        input=snippet,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
