"""One gunicorn process of the API exiting (a recycle, the first of several to stop) leaves the others serving."""

from __future__ import annotations

import os
import signal

import pytest
import requests

from tests.conftest import wait_for
from tests.e2e.conftest import start_service, stop_service
from tests.support import children

pytestmark = pytest.mark.e2e


def test_the_api_keeps_answering_after_one_of_its_processes_exits(tmp_path, database_url):
    service, processes = start_service(tmp_path, database_url, None, concurrency=2)
    arbiter = processes[0].pid
    first = wait_for(lambda: len(children(arbiter)) == 2 and children(arbiter), 30, "both API processes to start")
    gone = min(first)
    os.kill(gone, signal.SIGTERM)
    wait_for(lambda: len(children(arbiter)) == 2 and gone not in children(arbiter), 30, "a new API process")

    # Every process counts each request in the metrics files they all share.
    answers = [service.post({"data": {"operation": "compute", "n": i}}).status_code for i in range(40)]
    assert answers == [202] * 40, f"logs in {tmp_path}"
    metrics = requests.get(f"{service.base_url}/metrics", timeout=10)
    assert metrics.status_code == 200
    assert stop_service(processes) == [0, 0], f"a process did not exit cleanly; logs in {tmp_path}"
