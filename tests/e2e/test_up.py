"""`asyncproc up` on a machine with no DATABASE_URL: the README's quick start,
its example session and its operation recipe, run as written; the lock, the
stable port, Ctrl-C once and twice, and the CLI finding the embedded database."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import requests

from asyncproc.embedded import EmbeddedPostgres
from tests.conftest import free_port, wait_for
from tests.support import PROJECT_ROOT, user_env

pytestmark = pytest.mark.e2e

README = (PROJECT_ROOT / "README.md").read_text()


def _env(**extra: str) -> dict[str, str]:
    return user_env(ASYNCPROC_COMPUTE_SECONDS="0", ASYNCPROC_SHUTDOWN_GRACE_SECONDS="20", **extra)


def _up(cwd: Path, port: int, log_path: Path, **extra: str) -> subprocess.Popen:
    """`asyncproc up` in `cwd`, in a session of its own, as a terminal would run it."""
    return subprocess.Popen(
        [sys.executable, "-m", "asyncproc.cli", "up", "--bind", f"127.0.0.1:{port}"],
        cwd=cwd,
        env=_env(**extra),
        stdout=open(log_path, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _cli(cwd: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "asyncproc.cli", *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _ready(log_path: Path, port: int) -> bool:
    return f"asyncproc is up: http://127.0.0.1:{port}" in log_path.read_text()


def _ctrl_c(up: subprocess.Popen) -> None:
    """What a terminal's Ctrl-C does: SIGINT to every process of the foreground group."""
    os.killpg(up.pid, signal.SIGINT)


def _refuses(port: int) -> bool:
    try:
        requests.get(f"http://127.0.0.1:{port}/health", timeout=1)
    except requests.ConnectionError:
        return True
    except requests.Timeout:
        # Still listening while it shuts down.
        return False
    return False


def _postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postgres" / "pgdata" / "postmaster.pid").read_text().split()[0])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def _task(port: int, task_id: str) -> dict:
    return requests.get(f"http://127.0.0.1:{port}/results/{task_id}", timeout=5).json()


def _submit(port: int, body: dict) -> str:
    response = requests.post(f"http://127.0.0.1:{port}/process", json=body, timeout=10)
    assert response.status_code == 202, response.text
    return response.json()["task_id"]


def _example_session() -> list[tuple[str, str]]:
    """(command, documented answer) pairs of the README's example session."""
    section = README[README.index("## An example session") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    pairs = []
    for chunk in block.strip().split("\n\n"):
        lines = chunk.splitlines()
        command_lines = [lines[0].removeprefix("$ ")]
        while command_lines[-1].endswith("\\"):
            command_lines.append(lines[len(command_lines)])
        answer = "".join(line.strip() for line in lines[len(command_lines) :])
        pairs.append(("\n".join(command_lines), answer))
    return pairs


def _readme_block(marker: str, language: str) -> str:
    for block in re.findall(rf"```{language}\n(.*?)```", README, re.S):
        if marker in block:
            return block
    raise AssertionError(f"no {language} block with {marker!r} in the README")


def _docs_block(name: str, marker: str) -> str:
    for block in re.findall(r"```bash\n(.*?)```", (PROJECT_ROOT / "docs" / name).read_text(), re.S):
        if marker in block:
            return block
    raise AssertionError(f"no bash block with {marker!r} in docs/{name}")


def _script_path() -> str:
    """PATH with the installed `asyncproc` script first, as in an activated virtualenv."""
    return f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"


_VARYING = {"task_id", "created_at", "completed_at", "started_at", "scheduled_at"}


def test_up_as_the_readme_says(tmp_path):
    (tmp_path / "myops.py").write_text(_readme_block("# myops.py", "python"))
    port = free_port()
    log = tmp_path / "up.log"
    up = _up(tmp_path, port, log, ASYNCPROC_OPERATIONS_MODULE="myops")
    try:
        wait_for(lambda: _ready(log, port) or up.poll() is not None, 90, f"asyncproc up ({log})", interval=0.2)
        assert _ready(log, port), log.read_text()
        # "is up" comes after the API answered, never before.
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        text = log.read_text()
        database_url = re.search(r"DATABASE_URL=(\S+)", text).group(1)
        assert "asyncproc psql" in text
        data_dir = tmp_path / ".asyncproc"
        kept_port = int((data_dir / "postgres" / "port").read_text())
        assert f":{kept_port}/" in database_url

        # The README's example session, each answer compared with the documented one.
        documented_id = None
        real_id = None
        for command, answer in _example_session():
            if documented_id:
                command = command.replace(documented_id, real_id)
            command = command.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
            result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30)
            assert result.returncode == 0, result.stderr
            got, expected = json.loads(result.stdout), json.loads(answer)
            assert set(got) == set(expected), command
            assert {k: v for k, v in got.items() if k not in _VARYING} == {
                k: v for k, v in expected.items() if k not in _VARYING
            }, command
            if documented_id is None:
                documented_id, real_id = expected["task_id"], got["task_id"]

        # docs/api.md's waiting without polling, on the example's task.
        waiting = _docs_block("api.md", "$ID?wait=30").replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        result = subprocess.run(["bash", "-c", waiting], env={**_env(), "ID": real_id}, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.count(f'"task_id":"{real_id}"') == 2 and "event: task" in result.stdout, result.stdout

        # The operation recipe, saved in the current directory as the README says.
        thumbnail = _submit(port, {"operation": "thumbnail", "data": {"url": "https://example.com/a.png"}})
        done = wait_for(lambda: (t := _task(port, thumbnail))["status"] == "completed" and t, 30, "the thumbnail")
        assert done["result"] == {"thumbnail": "s3://bucket/thumbs/abc.png"}

        # Commands run in the same directory find the embedded database:
        # docs/configuration.md's example as written, then more.
        for line in _docs_block("configuration.md", "asyncproc status").strip().splitlines():
            documented = subprocess.run(
                ["bash", "-c", line], cwd=tmp_path, env={**_env(), "PATH": _script_path()}, capture_output=True, text=True, timeout=30
            )
            assert documented.returncode == 0 and documented.stdout, (line, documented.stderr)
        status = _cli(tmp_path, "status")
        assert status.returncode == 0, status.stderr
        assert f"API http://127.0.0.1:{port}" in status.stdout and "workers:  1" in status.stdout
        assert re.search(r"completed \d+", status.stdout)
        psql = _cli(tmp_path, "psql", "-At", "-c", "SELECT count(*) FROM tasks WHERE status = 'completed'")
        assert psql.returncode == 0 and int(psql.stdout) >= 2, psql.stderr
        pending = _submit(port, {"operation": "sleep", "data": {"seconds": 1}, "delay_seconds": 3600})
        keys = _cli(tmp_path, "keys", "list")
        assert keys.returncode == 0, keys.stderr
        cancel = _cli(tmp_path, "cancel", pending)
        assert cancel.returncode == 0 and json.loads(cancel.stdout)["status"] == "cancelled", cancel.stderr

        # A second `up` in the same directory says who runs, exits at once, and stops nothing.
        postmaster = _postmaster_pid(data_dir)
        second = subprocess.run(
            [sys.executable, "-m", "asyncproc.cli", "up", "--bind", f"127.0.0.1:{free_port()}"],
            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=30,
        )
        assert second.returncode == 1
        assert f"another `asyncproc up` (pid {up.pid}, API http://127.0.0.1:{port})" in second.stderr
        assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1
        assert _alive(postmaster)
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["database"] == "ok"

        # One Ctrl-C: the running task finishes, then everything stops.
        running = _submit(port, {"operation": "sleep", "data": {"seconds": 2}})
        wait_for(lambda: f"task {running} started:" in log.read_text(), 10, "the sleep task's handler to start")
        _ctrl_c(up)
        assert up.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert not _alive(postmaster)
    assert _refuses(port)

    # The task ran to its end; the data and the port were kept.
    embedded = EmbeddedPostgres(data_dir / "postgres")
    assert embedded.port == kept_port
    embedded.start()
    try:
        with psycopg.connect(embedded.admin_url("asyncproc")) as conn:
            row = conn.execute("SELECT status, attempts FROM tasks WHERE task_id = %s", (running,)).fetchone()
    finally:
        embedded.stop()
    assert row == ("completed", 1)
    assert embedded.port == kept_port


def test_a_second_ctrl_c_stops_at_once_and_requeues_the_task(tmp_path):
    port = free_port()
    log = tmp_path / "up.log"
    up = _up(tmp_path, port, log)
    try:
        wait_for(lambda: _ready(log, port) or up.poll() is not None, 90, f"asyncproc up ({log})", interval=0.2)
        assert _ready(log, port), log.read_text()
        task_id = _submit(port, {"operation": "sleep", "data": {"seconds": 600}})
        # Its handler, not only its claim: a stop between the two returns the task unstarted.
        wait_for(lambda: f"task {task_id} started:" in log.read_text(), 10, "the sleep task's handler to start")
        _ctrl_c(up)
        wait_for(lambda: "a second Ctrl-C stops at once" in log.read_text().split("is up:")[1], 10, "the first Ctrl-C")
        _ctrl_c(up)
        # Far less than the 20 s grace period.
        assert up.wait(15) == 0, log.read_text()[-3000:]
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    embedded = EmbeddedPostgres(tmp_path / ".asyncproc" / "postgres")
    embedded.start()
    try:
        with psycopg.connect(embedded.admin_url("asyncproc")) as conn:
            row = conn.execute("SELECT status, error_message, attempts FROM tasks WHERE task_id = %s", (task_id,)).fetchone()
    finally:
        embedded.stop()
    # Cut short by the shutdown, not failed: the attempt is given back.
    assert row == ("pending", "interrupted by worker shutdown; attempt not counted", 0), row


def test_a_busy_port_is_one_clear_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _cli(tmp_path, "up", "--bind", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"asyncproc: port {port} on 127.0.0.1 is in use by another program; choose another with --bind HOST:PORT"
    )
    assert "is up" not in result.stdout


def test_a_broken_operations_module_is_one_line_before_anything_starts(tmp_path):
    (tmp_path / "brokenops.py").write_text("import no_such_module_here\n")
    # The installed script, which unlike `python -m` does not put the current
    # directory on the path: brokenops.py is found there, and its own import fails.
    script = Path(sys.executable).parent / "asyncproc"
    for command in (["up"], ["api"], ["worker"]):
        result = subprocess.run(
            [str(script), *command], cwd=tmp_path,
            env=_env(ASYNCPROC_OPERATIONS_MODULE="brokenops", DATABASE_URL="postgresql://nobody@127.0.0.1:1/none"),
            capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == 2, command
        assert result.stderr.strip() == (
            "asyncproc: configuration error: ASYNCPROC_OPERATIONS_MODULE='brokenops' cannot be imported: "
            "ModuleNotFoundError: No module named 'no_such_module_here'"
        ), command
    assert not (tmp_path / ".asyncproc").exists()


def test_up_adopts_the_database_of_a_crashed_up(tmp_path):
    data_dir = tmp_path / ".asyncproc"
    port = free_port()
    first_log = tmp_path / "first.log"
    up = _up(tmp_path, port, first_log)
    try:
        wait_for(lambda: _ready(first_log, port), 90, f"asyncproc up to be ready ({first_log})", interval=0.2)
        task_id = _submit(port, {"data": {"n": 42}})
        wait_for(lambda: _task(port, task_id)["status"] == "completed", 30, "the task to complete")
        postmaster = _postmaster_pid(data_dir)
    finally:
        # A crash: `up` dies at once. Its API and worker follow it; the database stays.
        up.send_signal(signal.SIGKILL)
        up.wait(10)
    wait_for(lambda: _refuses(port), 30, "the API to go away with its parent", interval=0.2)
    assert _alive(postmaster)

    second_log = tmp_path / "second.log"
    up = _up(tmp_path, port, second_log)
    try:
        wait_for(lambda: _ready(second_log, port), 60, f"the second asyncproc up ({second_log})", interval=0.2)
        assert re.search(r"reusing the embedded PostgreSQL already running \(pid %d" % postmaster, second_log.read_text())
        kept = _task(port, task_id)
        assert kept["status"] == "completed" and kept["result"] == 861
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0
    assert _refuses(port)
    assert not _alive(postmaster)
