"""Handlers that cannot hurt the service: crashes, hangs, memory hogs and ignored
cancellations cost their own attempt, never the worker (worker/pool.py)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import requests

from asyncproc import db
from tests.conftest import free_port, wait_for
from tests.e2e.conftest import _start, service_env, start_service, stop_service

CONCURRENCY = 3


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def isolated(tmp_path_factory, database_url, redis_url, runs_dir):
    metrics_port = free_port()
    extra = {
        "ASYNCPROC_TEST_RUNS_DIR": str(runs_dir),
        "ASYNCPROC_WORKER_METRICS_PORT": str(metrics_port),
        "ASYNCPROC_HANDLER_MEMORY_MB": "256",
    }
    logs = tmp_path_factory.mktemp("isolation")
    service, processes = start_service(logs, database_url, redis_url, concurrency=CONCURRENCY, extra_env=extra)
    service.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    service.processes = processes
    service.env = service_env(database_url, redis_url, extra)
    yield service
    assert stop_service(service.processes) == [0] * len(service.processes), f"logs in {service.logs}"


def runs(runs_dir: Path, task_id: str) -> list[dict]:
    path = runs_dir / f"{task_id}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    # A process reaped between the open and the read fails the read with ESRCH.
    except (FileNotFoundError, ProcessLookupError):
        return False


def started(runs_dir: Path, task_id: str, count: int = 1) -> list[dict]:
    return wait_for(lambda: len(runs(runs_dir, task_id)) >= count and runs(runs_dir, task_id), 20,
                    f"run {count} of task {task_id} to start", interval=0.02)


def worker_pid(service) -> int:
    return service.processes[1].pid


def test_a_handler_that_kills_its_process_costs_only_its_own_attempt(isolated):
    bystander = isolated.submit({"operation": "sleep", "data": {"seconds": 1}})
    crashes = {
        how: isolated.submit({"operation": "crash", "data": {"how": how, "times": 1}})
        for how in ("exit", "sigkill", "segfault")
    }
    for how, task_id in crashes.items():
        body = isolated.wait_finished(task_id)
        assert (body["status"], body["attempts"], body["result"]) == ("completed", 2, {"survived_attempt": 2}), how
    assert isolated.get(crashes["exit"]).json()["error_message"] == "the handler's process died: exited with code 3"
    assert isolated.get(crashes["sigkill"]).json()["error_message"] == "the handler's process died: killed by SIGKILL"
    assert isolated.get(crashes["segfault"]).json()["error_message"] == "the handler's process died: killed by SIGSEGV"
    # The task running beside the crashes finished its one attempt, in the same worker.
    body = isolated.wait_finished(bystander)
    assert (body["status"], body["attempts"]) == ("completed", 1)
    assert isolated.processes[1].poll() is None


def test_a_handler_that_always_crashes_fails_after_its_attempts(isolated):
    task_id = isolated.submit({"operation": "crash", "data": {"how": "segfault"}, "max_attempts": 2})
    body = isolated.wait_finished(task_id)
    assert (body["status"], body["attempts"]) == ("failed", 2)
    assert body["error_message"] == "the handler's process died: killed by SIGSEGV"


@pytest.mark.parametrize(
    "request_body",
    [
        {"operation": "hang", "data": {"seconds": 60}, "timeout_seconds": 0.5},
        {"operation": "hang", "data": {"seconds": 60, "spin": True}, "timeout_seconds": 0.5},
        {"operation": "hang_briefly", "data": {"seconds": 60}},
    ],
    ids=["sleeping, task limit", "spinning, task limit", "operation limit"],
)
def test_a_handler_past_its_time_limit_is_stopped_for_certain(isolated, runs_dir, request_body):
    task_id = isolated.submit({**request_body, "max_attempts": 1})
    body = isolated.wait_finished(task_id, timeout=10)
    assert (body["status"], body["attempts"]) == ("failed", 1)
    assert body["error_message"] == "the handler hit its time limit of 0.5s and was stopped"
    for run in runs(runs_dir, task_id):
        assert not alive(run["pid"])


def test_a_time_limit_set_by_a_psql_insert_is_applied(isolated, database_url):
    with db.connect(database_url) as conn:
        task_id = str(conn.execute(
            "INSERT INTO tasks (operation, payload, timeout_seconds, max_attempts)"
            " VALUES ('hang', '{\"seconds\": 60}', 0.5, 2) RETURNING task_id"
        ).fetchone()["task_id"])
    body = isolated.wait_finished(task_id, timeout=15)
    assert (body["status"], body["attempts"]) == ("failed", 2)
    assert "time limit of 0.5s" in body["error_message"]


def test_a_thread_handler_is_asked_to_stop_at_its_time_limit(isolated):
    task_id = isolated.submit({"operation": "hang_in_thread", "timeout_seconds": 0.3, "max_attempts": 1})
    body = isolated.wait_finished(task_id, timeout=10)
    assert (body["status"], body["error_message"]) == (
        "failed", "the handler hit its time limit of 0.3s and stopped on request"
    )


def test_a_handler_past_its_memory_limit_fails_its_attempt_and_the_worker_lives(isolated):
    hog = isolated.submit({"operation": "hog", "data": {"mb": 512}, "max_attempts": 1})
    modest = isolated.submit({"operation": "hog", "data": {"mb": 8}})
    body = isolated.wait_finished(hog)
    assert (body["status"], body["error_message"]) == ("failed", "the handler went past its memory limit of 64 MB")
    assert isolated.wait_finished(modest)["result"] == {"allocated_mb": 8}
    assert isolated.processes[1].poll() is None


def test_the_workers_default_memory_limit_applies_where_the_operation_sets_none(isolated):
    over = isolated.submit({"operation": "hog_default", "data": {"mb": 512}, "max_attempts": 1})
    under = isolated.submit({"operation": "hog_default", "data": {"mb": 128}})
    body = isolated.wait_finished(over)
    assert (body["status"], body["error_message"]) == ("failed", "the handler went past its memory limit of 256 MB")
    assert isolated.wait_finished(under)["result"] == {"allocated_mb": 128}


def test_an_async_handler_past_its_time_limit_is_cancelled(isolated):
    task_id = isolated.submit({"operation": "async_hang", "timeout_seconds": 0.3, "max_attempts": 1})
    body = isolated.wait_finished(task_id, timeout=10)
    assert (body["status"], body["error_message"]) == (
        "failed", "the handler hit its time limit of 0.3s and was cancelled"
    )


def test_a_result_the_worker_cannot_take_back_fails_the_task_not_the_worker(isolated):
    deep = isolated.submit({"operation": "deep_result", "data": {"depth": 3000}})
    big = isolated.submit({"operation": "big_number", "data": {"digits": 5000}})
    body = isolated.wait_finished(deep)
    assert body["status"] == "failed" and "cannot be sent back to the worker" in body["error_message"]
    body = isolated.wait_finished(big)
    assert body["status"] == "failed" and "cannot be stored as JSON" in body["error_message"]
    assert isolated.wait_finished(isolated.submit({"operation": "shout"}))["status"] == "completed"


def test_a_result_the_database_refuses_fails_its_task_alone_not_its_completion_batch(isolated):
    neighbours = [isolated.submit({"operation": "async_echo", "data": {"n": n}}) for n in range(20)]
    refused = isolated.submit({"operation": "nul_result"})
    neighbours += [isolated.submit({"operation": "async_echo", "data": {"n": n}}) for n in range(20, 40)]
    body = isolated.wait_finished(refused)
    assert body["status"] == "failed" and "the handler's result cannot be stored" in body["error_message"]
    for n, task_id in enumerate(neighbours):
        body = isolated.wait_finished(task_id)
        assert (body["status"], body["result"]) == ("completed", {"n": n})


def test_cancelling_ignored_handlers_stops_them_within_a_second_and_frees_their_slots(isolated, runs_dir):
    hung = [isolated.submit({"operation": "hang", "data": {"seconds": 60}}) for _ in range(CONCURRENCY)]
    pids = {task_id: started(runs_dir, task_id)[0]["pid"] for task_id in hung}
    for task_id in hung:
        response = requests.post(f"{isolated.base_url}/results/{task_id}/cancel", timeout=10)
        asked = time.monotonic()
        assert response.json()["status"] == "cancelled"
        wait_for(lambda: not alive(pids[task_id]), 1.0, f"the handler of {task_id} to be stopped", interval=0.01)
        assert time.monotonic() - asked < 1.0
    # Every slot was taken by a cancelled handler; all are free again.
    assert isolated.wait_finished(isolated.submit({"operation": "shout"}), timeout=5)["status"] == "completed"


def test_a_retry_right_after_a_cancel_never_overlaps_the_cancelled_attempt(isolated, runs_dir):
    task_id = isolated.submit({"operation": "hang", "data": {"seconds": 60}})
    started(runs_dir, task_id)
    for _ in range(2):
        assert requests.post(f"{isolated.base_url}/results/{task_id}/cancel", timeout=10).status_code == 200
        assert requests.post(f"{isolated.base_url}/results/{task_id}/retry", timeout=10).status_code == 202
    attempts = started(runs_dir, task_id, 2)
    assert [run["earlier_alive"] for run in attempts] == [[]] * len(attempts)
    requests.post(f"{isolated.base_url}/results/{task_id}/cancel", timeout=10)


def test_a_task_waits_for_a_worker_that_knows_its_operation(isolated, database_url, tmp_path):
    with db.connect(database_url) as conn:
        task_id = str(conn.execute(
            "INSERT INTO tasks (operation, max_attempts) VALUES ('late_op', 1) RETURNING task_id"
        ).fetchone()["task_id"])

    def put_back():
        body = isolated.get(task_id).json()
        return body if body["error_message"] else None

    body = wait_for(put_back, 10, "the old worker to put the task back")
    assert (body["status"], body["attempts"]) == ("pending", 0)
    assert body["error_message"] == "waiting for a worker that knows operation 'late_op'"

    env = {**isolated.env, "ASYNCPROC_OPERATIONS_MODULE": "tests.e2e.late_operations"}
    env.pop("ASYNCPROC_WORKER_METRICS_PORT")
    isolated.processes.append(_start(["worker", "--concurrency", "1"], env, tmp_path / "late-worker.log"))
    body = isolated.wait_finished(task_id, timeout=30)
    assert (body["status"], body["attempts"], body["result"]) == ("completed", 1, {"ran_on_attempt": 1})


def test_a_task_whose_operation_no_worker_learns_fails_after_the_grace_period(isolated, database_url):
    with db.connect(database_url) as conn:
        task_id = str(conn.execute(
            "INSERT INTO tasks (operation, created_at) VALUES ('never_known', now() - interval '16 minutes')"
            " RETURNING task_id"
        ).fetchone()["task_id"])
    body = isolated.wait_finished(task_id)
    assert body["status"] == "failed"
    assert body["error_message"].startswith("unknown operation 'never_known': no worker that knows it took the task within 900s")


def test_the_worker_counts_crashes_time_outs_and_memory_kills(isolated):
    text = requests.get(isolated.metrics_url, timeout=10).text

    def count(operation: str, kind: str) -> float:
        prefix = f'asyncproc_worker_handler_stops_total{{kind="{kind}",operation="{operation}"}} '
        lines = [line for line in text.splitlines() if line.startswith(prefix)]
        return float(lines[0].rpartition(" ")[2]) if lines else 0.0

    assert count("crash", "crash") >= 5
    assert count("hang", "timeout") >= 2
    assert count("hog", "memory") == 1


def test_shutdown_waits_for_handlers_then_stops_them_and_a_killed_worker_takes_them_along(isolated, runs_dir, database_url, tmp_path):
    grace = 1
    env = {**isolated.env, "ASYNCPROC_SHUTDOWN_GRACE_SECONDS": str(grace)}
    env.pop("ASYNCPROC_WORKER_METRICS_PORT")
    for process in isolated.processes[1:]:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    worker = _start(["worker", "--concurrency", "2"], env, tmp_path / "shutdown-worker.log")
    isolated.processes[1:] = [worker]
    short = isolated.submit({"operation": "hang", "data": {"seconds": 0.5}})
    long = isolated.submit({"operation": "hang", "data": {"seconds": 60}})
    pid = started(runs_dir, long)[0]["pid"]
    started(runs_dir, short)

    worker.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    assert worker.wait(grace + 10) == 0
    assert time.monotonic() - stopped_at < grace + 5
    assert not alive(pid)
    assert isolated.get(short).json()["status"] == "completed"
    body = isolated.get(long).json()
    assert (body["status"], body["attempts"], body["error_message"]) == (
        "pending", 0, "interrupted by worker shutdown; attempt not counted"
    )

    del isolated.processes[1:]

    # A worker killed outright takes its handlers with it: nothing of the
    # attempt runs on while the task waits to be re-queued elsewhere.
    worker = _start(["worker", "--concurrency", "2"], env, tmp_path / "killed-worker.log")
    pid = started(runs_dir, long, 2)[1]["pid"]
    worker.kill()
    assert worker.wait(10) == -signal.SIGKILL
    wait_for(lambda: not alive(pid), 5, "the killed worker's handler process to die")

    # Not left for the workers of later test modules.
    with db.connect(database_url) as conn:
        conn.execute("SELECT asyncproc_cancel(%s)", (long,))


def test_a_cancel_that_lands_while_the_handler_process_starts_leaves_none_behind(tmp_path, database_url, redis_url):
    # A fresh worker has no idle handler process: the first task waits for one
    # to start, and a cancel right after the claim lands in that start.
    service, processes = start_service(tmp_path, database_url, redis_url, concurrency=1,
                                       extra_env={"ASYNCPROC_SHUTDOWN_GRACE_SECONDS": "2"})
    try:
        task_id = service.submit({"operation": "sleep", "data": {"seconds": 60}})
        wait_for(lambda: service.get(task_id).json()["status"] == "running", 20, "the task to be claimed", interval=0.005)
        assert requests.post(f"{service.base_url}/results/{task_id}/cancel", timeout=10).json()["status"] == "cancelled"
    finally:
        # A handler process that nobody tracked would run its 60 s sleep and
        # hold the worker's exit; tracked ones are stopped, and it exits at once.
        stopping = time.monotonic()
        assert stop_service(processes) == [0, 0], f"logs in {tmp_path}"
        assert time.monotonic() - stopping < 15, f"the worker took its time to exit; logs in {tmp_path}"
