"""worker.forkserver_adapter's private names of multiprocessing hold on the running Python.

Each check names the private name it found changed, so that a Python upgrade
that breaks the adapter fails here, not as handler processes that outlive
their worker.
"""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing import forkserver

from worker.forkserver_adapter import PRIVATE_NAMES

ALIVE_FD = "multiprocessing.forkserver.ForkServer._forkserver_alive_fd"


def test_the_adapter_lists_exactly_the_names_checked_here():
    assert set(PRIVATE_NAMES) == {"multiprocessing.forkserver._forkserver", ALIVE_FD}


def test_the_module_keeps_its_fork_server_in_a_private_name():
    server = getattr(forkserver, "_forkserver", None)
    assert isinstance(server, forkserver.ForkServer), "multiprocessing.forkserver._forkserver changed"
    assert hasattr(server, "_forkserver_alive_fd"), f"{ALIVE_FD} is gone"


def _report(answers) -> None:
    fd = forkserver._forkserver._forkserver_alive_fd
    answers.put((fd, fd is not None and os.fstat(fd) is not None))


def test_a_child_of_the_fork_server_holds_the_alive_pipe_in_that_name():
    context = multiprocessing.get_context("forkserver")
    answers = context.Queue()
    child = context.Process(target=_report, args=(answers,))
    child.start()
    fd, open_ = answers.get(timeout=60)
    child.join(60)
    assert isinstance(fd, int) and open_, f"{ALIVE_FD} no longer holds the child's end of the pipe: {fd!r}"
