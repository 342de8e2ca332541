"""What worker.app.JobManager relies on in Procrastinate's Worker.

Our JobManager overrides Procrastinate's public manager methods, and its
design holds only as long as Procrastinate's Worker calls them as it does
today: it prunes stalled workers, then registers, and passes the id it got to
every later call; it fetches one job per free slot and finishes each job it
started; its heartbeat and listener run between register and unregister and
stop first when the worker stops; a job that a fetch returns after the stop is
still started (JobManager.stop_fetching); and it unregisters last, once every
started job has finished. These tests check the methods and their signatures
against the installed Procrastinate, then run a real Procrastinate Worker on a
database holding Procrastinate's own schema, with a manager that records each
call, and check the order.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import procrastinate
import pytest
from procrastinate import manager
from procrastinate import worker as procrastinate_worker

from worker.app import JobManager

VERSION = importlib.metadata.version("procrastinate")
# Every manager method Procrastinate's Worker calls.
CALLED = {
    "prune_stalled_workers",
    "register_worker",
    "listen_for_jobs",
    "fetch_job",
    "update_heartbeat",
    "list_jobs_to_abort_async",
    "retry_job",
    "finish_job",
    "unregister_worker",
}
# Those that worker.app.JobManager overrides.
OVERRIDDEN = sorted(name for name in vars(JobManager) if not name.startswith("_") and hasattr(manager.JobManager, name))
QUEUE = "contract"
DEADLINE_SECONDS = 30.0
FAST = 0.05


def _shape(method: Callable[..., Any]) -> list[tuple[str, str, bool]]:
    """Names, kinds and which have defaults: what decides how a call binds (annotations do not)."""
    return [(p.name, p.kind.name, p.default is not p.empty) for p in inspect.signature(method).parameters.values()]


def test_procrastinates_worker_calls_exactly_these_manager_methods():
    called = set(re.findall(r"self\.app\.job_manager\.(\w+)\(", inspect.getsource(procrastinate_worker)))
    assert called == CALLED, (
        f"Procrastinate {VERSION}'s Worker now calls {sorted(called - CALLED)} and no longer "
        f"{sorted(CALLED - called)} on its JobManager: worker.app.JobManager was designed for {sorted(CALLED)}"
    )


def test_the_overridden_methods_are_the_ones_the_worker_calls_but_retry_and_the_abort_poll():
    assert set(OVERRIDDEN) == CALLED - {"prune_stalled_workers", "retry_job", "list_jobs_to_abort_async"}, OVERRIDDEN


@pytest.mark.parametrize("name", OVERRIDDEN)
def test_each_overridden_method_keeps_procrastinates_signature(name):
    theirs = getattr(manager.JobManager, name, None)
    assert theirs is not None, f"Procrastinate {VERSION} has no JobManager.{name}: worker.app.JobManager overrides it"
    assert inspect.iscoroutinefunction(theirs) and inspect.iscoroutinefunction(getattr(JobManager, name))
    assert _shape(getattr(JobManager, name)) == _shape(theirs), (
        f"Procrastinate {VERSION} changed JobManager.{name} to {inspect.signature(theirs)}; "
        f"worker.app.JobManager overrides it as {inspect.signature(getattr(JobManager, name))}"
    )


@dataclass
class Call:
    name: str
    args: tuple
    kwargs: dict
    result: Any = None


@dataclass
class Log:
    """Calls to the manager and marks of what the test saw, in the order they came."""

    entries: list[Call | str] = field(default_factory=list)

    def calls(self, name: str | None = None) -> list[Call]:
        return [entry for entry in self.entries if isinstance(entry, Call) and name in (None, entry.name)]

    def index(self, entry: Call | str) -> int:
        return next(i for i, seen in enumerate(self.entries) if seen is entry or seen == entry)


class Recording(manager.JobManager):
    """Procrastinate's own manager, noting each call its Worker makes; `held`, when set, holds the next fetch."""

    def __init__(self, connector: procrastinate.PsycopgConnector, log: Log):
        super().__init__(connector)
        self.log = log
        self.held: asyncio.Event | None = None


def _recorded(name: str) -> Callable[..., Any]:
    async def method(self: Recording, *args: Any, **kwargs: Any) -> Any:
        call = Call(name, args, kwargs)
        self.log.entries.append(call)
        if name == "fetch_job" and self.held is not None:
            held, self.held = self.held, None
            self.log.entries.append("fetch held")
            await held.wait()
        try:
            call.result = await getattr(manager.JobManager, name)(self, *args, **kwargs)
        except asyncio.CancelledError:
            self.log.entries.append(f"{name} cancelled")
            raise
        return call.result

    method.__name__ = name
    return method


for _name in CALLED:
    setattr(Recording, _name, _recorded(_name))


class _StopSeen(logging.Handler):
    """Procrastinate's Worker logs its stop as action `stopping_worker`, once it has taken it."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen = False

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "action", None) == "stopping_worker":
            self.seen = True


async def _until(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {DEADLINE_SECONDS:g}s waiting for {what}")
        await asyncio.sleep(0.01)


async def _run_worker(database_url: str) -> Log:
    """Job A runs; a fetch is held while job B is deferred and the worker is stopped; then both end."""
    log = Log()
    released = asyncio.Event()
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=database_url))
    recording = Recording(app.connector, log)
    app.job_manager = recording

    @app.task(name="contract.hold", queue=QUEUE)
    async def hold(name: str) -> None:
        log.entries.append(f"run {name}")
        async with asyncio.timeout(DEADLINE_SECONDS):
            await released.wait()

    stop_seen = _StopSeen()
    worker_logger = logging.getLogger(procrastinate_worker.__name__)
    level = worker_logger.level
    worker_logger.addHandler(stop_seen)
    worker_logger.setLevel(logging.INFO)
    try:
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
            await hold.defer_async(name="A")
            run = asyncio.create_task(app.run_worker_async(
                queues=[QUEUE], concurrency=2, wait=True, listen_notify=True, install_signal_handlers=False,
                delete_jobs="never", fetch_job_polling_interval=FAST, abort_job_polling_interval=FAST,
                update_heartbeat_interval=FAST, shutdown_graceful_timeout=DEADLINE_SECONDS,
            ))
            await _until(lambda: "run A" in log.entries and log.calls("update_heartbeat")
                         and log.calls("list_jobs_to_abort_async"), "job A to run, a heartbeat and a poll for aborts")
            recording.held = asyncio.Event()
            held = recording.held
            await _until(lambda: "fetch held" in log.entries, "the free slot's next fetch")
            await hold.defer_async(name="B")
            # As worker/main.py stops it: by cancelling its task.
            run.cancel()
            await _until(lambda: stop_seen.seen, "Procrastinate's worker to take the stop")
            log.entries.append("stopped")
            held.set()
            await _until(lambda: "listen_for_jobs cancelled" in log.entries, "the worker's shutdown to begin")
            log.entries.append("released")
            released.set()
            await asyncio.wait({run}, timeout=DEADLINE_SECONDS)
            assert run.cancelled(), run
    finally:
        worker_logger.removeHandler(stop_seen)
        worker_logger.setLevel(level)
    return log


def _arguments(call: Call) -> dict[str, Any]:
    """The call's arguments by name, as Procrastinate's own method takes them."""
    return inspect.signature(getattr(manager.JobManager, call.name)).bind(None, *call.args, **call.kwargs).arguments


@pytest.fixture(scope="module")
def log(empty_database) -> Log:
    return asyncio.run(_run_worker(empty_database()))


def test_the_worker_prunes_stalled_workers_then_registers_before_anything_else(log):
    assert [call.name for call in log.calls()[:2]] == ["prune_stalled_workers", "register_worker"], log.calls()[:3]


def test_every_later_call_carries_the_id_the_registration_returned(log):
    (registered,) = log.calls("register_worker")
    for call in log.calls():
        if call.name in ("fetch_job", "update_heartbeat", "unregister_worker"):
            assert _arguments(call)["worker_id"] == registered.result, call


def test_each_call_fits_the_signature_of_our_override(log):
    for call in log.calls():
        if call.name in OVERRIDDEN:
            try:
                inspect.signature(getattr(JobManager, call.name)).bind(None, *call.args, **call.kwargs)
            except TypeError as exc:
                pytest.fail(f"Procrastinate {VERSION} calls {call.name}(*{call.args}, **{call.kwargs}), "
                            f"which worker.app.JobManager.{call.name} cannot take: {exc}")


def test_the_listener_heartbeat_and_abort_polls_run_between_register_and_unregister(log):
    (registered,) = log.calls("register_worker")
    (unregistered,) = log.calls("unregister_worker")
    for name in ("listen_for_jobs", "update_heartbeat", "list_jobs_to_abort_async"):
        calls = log.calls(name)
        assert calls, f"Procrastinate's worker never called {name}"
        assert all(log.index(registered) < log.index(call) < log.index(unregistered) for call in calls), name


def test_heartbeats_and_abort_polls_end_before_the_running_jobs_do(log):
    # JobManager keeps the worker's lease alive on its own thread: Procrastinate's heartbeat stops at once.
    shutdown = log.index("listen_for_jobs cancelled")
    late = [call for call in log.calls() if call.name in ("update_heartbeat", "list_jobs_to_abort_async")
            and log.index(call) > shutdown]
    assert not late, late
    assert shutdown < log.index("released") < log.index(log.calls("finish_job")[0])


def test_a_job_a_fetch_returns_after_the_stop_is_still_run_and_finished(log):
    fetched_late = next(call for call in log.calls("fetch_job") if log.index(call) < log.index("stopped")
                        and call.result is not None and call.result.task_kwargs == {"name": "B"})
    assert log.index("stopped") < log.index("run B"), log.entries
    assert fetched_late.result.id in {_arguments(call)["job"].id for call in log.calls("finish_job")}


def test_each_fetched_job_is_finished_and_unregister_comes_last(log):
    fetched = {call.result.id: log.index(call) for call in log.calls("fetch_job") if call.result is not None}
    assert len(fetched) == 2, log.entries
    finished = {}
    for call in log.calls("finish_job"):
        arguments = _arguments(call)
        finished[arguments["job"].id] = log.index(call)
        assert arguments["delete_job"] is False
    assert finished.keys() == fetched.keys()
    assert all(fetched[job_id] < finished[job_id] for job_id in fetched)
    assert log.calls()[-1].name == "unregister_worker"
    assert max(finished.values()) < log.index(log.calls("unregister_worker")[0])
