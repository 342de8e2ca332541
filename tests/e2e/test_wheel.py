"""The built wheel, installed into a fresh virtualenv outside the checkout, is a
working service on its own: it migrates an empty database and runs a task,
with its dependencies at the newest versions and at the lowest that setup.cfg
allows (uv's lowest-direct resolution; pip has none).

An editable install reads the checkout, so only this catches a wheel that
leaves something behind (the migrations once were).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from asyncproc import migrate
from tests.conftest import free_port, wait_for
from tests.e2e.conftest import Service, _healthy, stop_service
from tests.support import PROJECT_ROOT, package_sources

pytestmark = pytest.mark.e2e

# pip reads these from setup.cfg and pyproject.toml; the packages' directories come from setup.cfg.
PROJECT_FILES = ("setup.cfg", "pyproject.toml", "README.md")


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module", params=["newest", "lowest"])
def installed(request, tmp_path_factory) -> Iterator[Path]:
    """The bin/ directory of a fresh virtualenv with the wheel (and its dependencies from the registry) installed."""
    base = tmp_path_factory.mktemp("wheel")
    # Built from a copy: an in-tree build writes build/ and *.egg-info into the
    # checkout, where a concurrent run would share them.
    source = base / "source"
    source.mkdir()
    for name in PROJECT_FILES:
        shutil.copy2(PROJECT_ROOT / name, source / name)
    for top in {directory.relative_to(PROJECT_ROOT).parts[0] for directory in package_sources().values()}:
        shutil.copytree(PROJECT_ROOT / top, source / top, ignore=shutil.ignore_patterns("__pycache__"))
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(base / "dist"), str(source)],
         base, env, 300)
    (wheel,) = (base / "dist").glob("asyncproc-*.whl")
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], base, env, 120)
    python = str(venv / "bin" / "python")
    if request.param == "newest":
        _run([python, "-m", "pip", "install", "--quiet", str(wheel)], base, env, 300)
    else:
        _run([python, "-m", "pip", "install", "--quiet", "uv"], base, env, 300)
        _run([str(venv / "bin" / "uv"), "pip", "install", "--quiet", "--python", python, "--resolution", "lowest-direct",
              str(wheel)], base, env, 300)
    yield venv / "bin"
    # The virtualenv is a few hundred MB; the test's logs stay behind.
    shutil.rmtree(venv)


def test_the_wheel_migrates_an_empty_database_and_runs_a_task(installed, empty_database, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {
        **{name: value for name, value in os.environ.items()
           if not name.startswith("ASYNCPROC_") and name not in ("PYTHONPATH", "REDIS_URL")},
        "DATABASE_URL": empty_database(),
        "ASYNCPROC_COMPUTE_SECONDS": "0",
        "ASYNCPROC_WORKER_POLL_SECONDS": "0.2",
        "ASYNCPROC_SHUTDOWN_GRACE_SECONDS": "5",
    }
    located = _run([str(installed / "python"), "-c", "import asyncproc.config as c; print(c.Settings().migrations_dir)"],
                   elsewhere, env, 60)
    assert Path(located.stdout.strip()).is_relative_to(installed.parent), located.stdout

    migrated = _run([str(installed / "asyncproc"), "migrate"], elsewhere, env, 120)
    migrations = PROJECT_ROOT / "migrations"
    expected = [m.version for m in migrate.discover(migrations)] + [f.name for f in migrate.discover_current_state(migrations)]
    assert migrated.stdout.strip() == f"applied {len(expected)} migration(s): {', '.join(expected)}"

    port = free_port()
    processes = []
    for name, command in (("worker", ["worker", "--concurrency", "2"]),
                          ("api", ["api", "--bind", f"127.0.0.1:{port}", "--workers", "1"])):
        with open(tmp_path / f"{name}.log", "wb") as log:
            processes.append(subprocess.Popen([str(installed / "asyncproc"), *command], cwd=elsewhere, env=env,
                                              stdout=log, stderr=subprocess.STDOUT))
    service = Service(base_url=f"http://127.0.0.1:{port}", logs=tmp_path)
    try:
        wait_for(lambda: _healthy(service.base_url), 60, f"the API to answer /health (logs in {tmp_path})", interval=0.1)
        task_id = service.submit({"operation": "compute", "data": {"n": 10}})
        body = service.wait_finished(task_id, timeout=30)
        assert (body["status"], body["result"]) == ("completed", 45), body
    finally:
        codes = stop_service(processes)
    assert codes == [0, 0], f"a process did not exit cleanly; logs in {tmp_path}"
