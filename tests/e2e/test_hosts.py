"""The recipe for N hosts (docs/deployment.md), run for real: every host is a
network namespace with its own address, joined by a bridge, against one
PostgreSQL in a namespace of its own.

Hosts: `db` (PostgreSQL), `h1` and `h2` (an API and a worker each), `h3` (a
worker only). Each runs the documented command line for its role. The test process reaches them through one more leg on the bridge.
Everything lives in 10.231.15.0/24, created here and removed at the end; no
traffic leaves these namespaces. Skipped with the reason where namespaces
cannot be made (not root, no `ip`, no permission).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import requests

from asyncproc import db
from asyncproc.embedded import EmbeddedPostgres
from asyncproc.locate import EMBEDDED_DATABASE
from tests.conftest import wait_for
from tests.support import PROJECT_ROOT, user_env

pytestmark = pytest.mark.e2e

NET = "10.231.15"
ADDRESSES = {"root": f"{NET}.1", "db": f"{NET}.10", "h1": f"{NET}.11", "h2": f"{NET}.12", "h3": f"{NET}.13"}
API_PORT = 8000


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


class Network:
    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:5]
        self.switch = f"ap{tag}-sw"
        self.names = {host: f"ap{tag}-{host}" for host in ADDRESSES if host != "root"}
        self.root_link = f"ap{tag}r"

    def create(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for host, namespace in self.names.items():
            _ip("netns", "add", namespace)
            _ip("-n", self.switch, "link", "add", f"p-{host}", "type", "veth", "peer", "name", "eth0", "netns", namespace)
            _ip("-n", self.switch, "link", "set", f"p-{host}", "master", "br0", "up")
            _ip("-n", namespace, "addr", "add", f"{ADDRESSES[host]}/24", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
        _ip("link", "add", self.root_link, "type", "veth", "peer", "name", "p-root", "netns", self.switch)
        _ip("-n", self.switch, "link", "set", "p-root", "master", "br0", "up")
        _ip("addr", "add", f"{ADDRESSES['root']}/24", "dev", self.root_link)
        _ip("link", "set", self.root_link, "up")

    def remove(self) -> None:
        # Deleting a namespace deletes its veth ends, and with them their peers.
        for namespace in [*self.names.values(), self.switch]:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)

    def run(self, host: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.names[host])


@pytest.fixture
def network() -> Iterator[Network]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("the ip command (iproute2) is not installed")
    net = Network()
    try:
        net.create()
    except RuntimeError as exc:
        net.remove()
        pytest.skip(f"cannot create network namespaces here: {exc}")
    try:
        yield net
    finally:
        net.remove()


def _recipe(database_url: str) -> dict[str, tuple[dict[str, str], list[str]]]:
    """docs/deployment.md's N-host commands by role: (variables, command), with
    the real database's URL in place of the documented one."""
    section = (PROJECT_ROOT / "docs" / "deployment.md").read_text().split("## A recipe for N hosts")[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    recipe = {}
    for line in block.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        words = shlex.split(line)
        variables = {}
        while "=" in words[0]:
            name, _, value = words.pop(0).partition("=")
            variables[name] = value
        assert words[0] == "asyncproc" and "DATABASE_URL" in variables, line
        variables["DATABASE_URL"] = database_url
        recipe[words[1]] = (variables, [sys.executable, "-m", "asyncproc.cli", *words[1:]])
    assert set(recipe) == {"migrate", "api", "worker"}, recipe
    assert recipe["api"][0]["ASYNCPROC_BIND"] == f"0.0.0.0:{API_PORT}"
    return recipe


def _host_env(variables: dict[str, str]) -> dict[str, str]:
    return user_env(ASYNCPROC_COMPUTE_SECONDS="0", **variables)


def test_apis_and_workers_on_three_hosts_share_one_postgresql(network, tmp_path):
    database = EmbeddedPostgres(tmp_path / "db", durable=False, host=ADDRESSES["db"], wrapper=network.run("db"))
    database.start()
    processes: list[subprocess.Popen] = []
    try:
        url = database.ensure_database(EMBEDDED_DATABASE)
        recipe = _recipe(url)
        # `asyncproc migrate` from two hosts at once: safe, one applies and one waits.
        migrations = [
            subprocess.Popen([*network.run(host), *recipe["migrate"][1]], env=_host_env(recipe["migrate"][0]))
            for host in ("h1", "h2")
        ]
        assert [m.wait(60) for m in migrations] == [0, 0]

        logs: dict[str, Path] = {}

        def start(host: str, role: str, **extra: str) -> None:
            variables, command = recipe[role]
            log = tmp_path / f"{host}-{role}.log"
            logs[f"{host}-{role}"] = log
            processes.append(
                subprocess.Popen(
                    [*network.run(host), *command],
                    env=_host_env({**variables, **extra}),
                    stdout=open(log, "wb"),
                    stderr=subprocess.STDOUT,
                )
            )

        for host in ("h1", "h2"):
            start(host, "api", ASYNCPROC_API_WORKERS="1")
        for host in ("h1", "h2", "h3"):
            start(host, "worker", ASYNCPROC_WORKER_CONCURRENCY="2")
        apis = [f"http://{ADDRESSES[host]}:{API_PORT}" for host in ("h1", "h2")]
        for api in apis:
            wait_for(lambda: _healthy(api), 60, f"the API at {api}", interval=0.2)

        task_ids = []
        for index in range(30):
            response = requests.post(
                f"{apis[index % 2]}/process", json={"operation": "sleep", "data": {"seconds": 0.05}}, timeout=10
            )
            assert response.status_code == 202, response.text
            task_ids.append(response.json()["task_id"])

        def finished() -> bool:
            return all(
                requests.get(f"{apis[i % 2]}/results/{t}", timeout=5).json()["status"] == "completed"
                for i, t in enumerate(task_ids)
            )

        wait_for(finished, 60, "every task to complete", interval=0.2)

        started: dict[str, list[str]] = {}
        for name, log in logs.items():
            if name.endswith("-worker"):
                for task_id in re.findall(r"task (\S+) started", log.read_text()):
                    started.setdefault(task_id, []).append(name)
        assert sorted(started) == sorted(task_ids)
        assert all(len(hosts) == 1 for hosts in started.values()), "a task ran on two hosts"
        assert len({hosts[0] for hosts in started.values()}) >= 2, "one host ran every task"
        with db.connect(url) as conn:
            attempts = conn.execute("SELECT max(attempts) AS most FROM tasks").fetchone()["most"]
        assert attempts == 1
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(40)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        database.stop()


def _healthy(api: str) -> bool:
    try:
        return requests.get(f"{api}/health", timeout=1).status_code == 200
    except (requests.ConnectionError, requests.Timeout):
        # Not listening yet, or still starting on a busy machine: look again.
        return False
