"""The peers' virtualenvs: built once from pinned versions, cached, and reused."""

from __future__ import annotations

import glob
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

CACHE = Path.home() / ".cache" / "asyncproc-bench" / "peers"
# Written last: a directory without it is a build that was cut short, and is built again.
COMPLETE = ".complete"
INSTALL_TIMEOUT_SECONDS = 900


class PeerUnavailable(RuntimeError):
    """A peer's virtualenv could not be built: its Python is missing, or pip failed."""


@dataclass(frozen=True)
class Peer:
    name: str  # also its module: asyncproc.bench.peers.<name>
    label: str
    version: str
    requirements: tuple[str, ...]
    python: str  # "3.11", or "" for the Python running the bench

    @property
    def directory(self) -> Path:
        return CACHE / f"{self.name}-{self.version}"


def peers() -> list[Peer]:
    procrastinate = metadata.version("procrastinate")
    return [
        Peer("procrastinate_peer", "Procrastinate", procrastinate,
             (f"procrastinate=={procrastinate}", "psycopg[binary]"), ""),
        Peer("pgqueuer_peer", "PgQueuer", "1.6.0", ("pgqueuer==1.6.0", "asyncpg"), ""),
        # Oban for Python requires Python 3.12.
        Peer("oban_peer", "Oban (Python)", "0.7.0", ("oban==0.7.0", "psycopg[binary]"), "3.12"),
        Peer("celery_peer", "Celery + Redis", "5.7.0", ("celery[redis]==5.7.0",), ""),
    ]


def find_python(version: str) -> str:
    """An interpreter of `version`: one pyenv installed, or on PATH as pythonX.Y."""
    if not version:
        return sys.executable
    roots = [str(Path.home() / ".pyenv")]
    if shutil.which("pyenv"):
        roots.insert(0, subprocess.run(["pyenv", "root"], capture_output=True, text=True).stdout.strip())
    for root in roots:
        for candidate in sorted(glob.glob(f"{root}/versions/{version}.*/bin/python{version}"), reverse=True):
            return candidate
    found = shutil.which(f"python{version}")
    # pyenv's shim is on PATH even when no version it selects has that Python.
    if found and "/shims/" not in found:
        return found
    raise PeerUnavailable(f"no Python {version} found (on PATH as python{version}, or under pyenv's versions)")


def ensure(peer: Peer) -> Path:
    """The peer's interpreter, its virtualenv built first if the cache has none."""
    python = peer.directory / "bin" / "python"
    if (peer.directory / COMPLETE).exists():
        return python
    shutil.rmtree(peer.directory, ignore_errors=True)
    peer.directory.parent.mkdir(parents=True, exist_ok=True)
    log.info("building %s's virtualenv in %s", peer.label, peer.directory)
    try:
        subprocess.run([find_python(peer.python), "-m", "venv", str(peer.directory)], check=True,
                       capture_output=True, timeout=INSTALL_TIMEOUT_SECONDS)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *peer.requirements], check=True,
                       capture_output=True, timeout=INSTALL_TIMEOUT_SECONDS)
    except subprocess.CalledProcessError as error:
        shutil.rmtree(peer.directory, ignore_errors=True)
        raise PeerUnavailable(f"{peer.label}: {' '.join(error.cmd[:3])} failed: {error.stderr.decode()[-500:]}") from error
    except subprocess.TimeoutExpired as error:
        shutil.rmtree(peer.directory, ignore_errors=True)
        raise PeerUnavailable(f"{peer.label}: installing took more than {INSTALL_TIMEOUT_SECONDS}s") from error
    (peer.directory / COMPLETE).write_text(" ".join(peer.requirements) + "\n")
    return python
