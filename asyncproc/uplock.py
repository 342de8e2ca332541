"""One `asyncproc up` per data directory, and what it tells other commands.

The running `up` holds an exclusive flock on `<data dir>/up.lock` and writes
into it who it is: its pid and, once it is up, the API's address. The kernel
drops the lock when the process dies however it dies, so a stale file never
blocks the next `up`.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

LOCK_NAME = "up.lock"


class AlreadyRunning(Exception):
    pass


class UpLock:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.path = data_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = running(self.data_dir) or {}
            where = f", API {holder['api']}" if holder.get("api") else ""
            raise AlreadyRunning(
                f"another `asyncproc up` (pid {holder.get('pid', '?')}{where}) is running with the data directory "
                f"{self.data_dir}; stop it first, or give this one its own ASYNCPROC_DATA_DIR"
            ) from None
        self._fd = fd
        self.publish(api=None)

    def publish(self, **info: Any) -> None:
        assert self._fd is not None, "acquire() first"
        data = json.dumps({"pid": os.getpid(), **info}).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = None


def running(data_dir: Path) -> dict[str, Any] | None:
    """What the `up` holding this data directory published, or None when none holds it."""
    try:
        fd = os.open(data_dir / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 65536, 0).decode(errors="replace")
            try:
                return json.loads(text)
            except ValueError:
                # Caught between the truncate and the write of publish().
                return {}
        return None
    finally:
        os.close(fd)
