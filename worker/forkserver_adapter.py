"""The one place where the worker relies on private names of Python's multiprocessing.

A handler process must not outlive its worker (worker/pool.py): it asks the
kernel for SIGKILL when its parent, the fork server, exits, and the fork
server exits when the last holder of its "alive" pipe closes it. Every child
forked by the fork server inherits a copy of that pipe, which would keep the
fork server, and so the child, alive after the worker's death: the child
closes its copy. multiprocessing offers no public handle on it:

- ``multiprocessing.forkserver._forkserver``: the module's ForkServer;
- ``multiprocessing.forkserver.ForkServer._forkserver_alive_fd``: in a child
  of the fork server, its inherited end of the pipe (None elsewhere).

tests/unit/test_forkserver_contract.py checks both against the running Python.
"""

from __future__ import annotations

import os
from multiprocessing import forkserver

PRIVATE_NAMES = {
    "multiprocessing.forkserver._forkserver": "the module's ForkServer instance",
    "multiprocessing.forkserver.ForkServer._forkserver_alive_fd": "an int in a child of the fork server, else None",
}


def close_inherited_alive_pipe() -> None:
    """In a child of the fork server: close this process's copy of the fork server's alive pipe."""
    server = forkserver._forkserver
    if server._forkserver_alive_fd is not None:
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None
