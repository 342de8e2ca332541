"""The Procrastinate app and the one task it knows.

Every ledger task is dispatched as a Procrastinate job named `asyncproc.run_task`
whose arguments are the task id and, with access control on, its owner (see
asyncproc_defer_jobs in migrations/current/20_procrastinate_bridge.sql); fetching the job
claims the task and adds the claimed row as `claimed`
(migrations/current/30_procrastinate_claim_and_fetch.sql), which the job manager
hands to the run beside the job (JobManager.claims). The name is stable:
renaming it would orphan queued jobs.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Awaitable, Callable, Iterable

import procrastinate
from procrastinate import jobs, manager

from asyncproc import db
from worker.lease import Lease
from worker.runner import Runner

log = logging.getLogger(__name__)

TASK_NAME = "asyncproc.run_task"
QUEUE = "asyncproc"
# How often Procrastinate looks for cancelled jobs among the running ones (a
# notification usually comes first): a cancel that lands between a job's fetch
# and its start takes effect within this.
ABORT_POLL_SECONDS = 0.5
# The longest pause between two tries of a side loop (the listener, a finish)
# while the database is away.
MAX_RETRY_SECONDS = 2.0


class JobManager(manager.JobManager):
    """Procrastinate's job manager, fetching several fair jobs per round trip and finishing completed ones in batches.

    It is also where the worker's lease replaces Procrastinate's heartbeat
    (worker/lease.py): the worker's id is its lease's, kept across restarts of
    Procrastinate's loop, renewed by the lease's own thread (Procrastinate's
    heartbeat stops at the first moment of a shutdown), and given up by the
    worker process only once its last run has ended. A database error in a
    fetch, the listener or a finish never stops Procrastinate's loop, which
    would abort the running tasks: a fetch finds nothing until the database is
    back, and the others try again.

    Procrastinate's worker asks for one job per free slot, one round trip each.
    This one fetches a job for every free slot in one statement
    (asyncproc_fetch_jobs) and hands them out from a buffer: the worker takes
    them at once, since it only asks while it has a free slot, and the buffer
    never holds more than the free slots. Jobs still in the buffer when the
    worker stops were never started: they are returned (their tasks pending
    again, attempt not counted). A completed task's job is finished by the
    statement that records the outcome (migrations/current/31_worker_outcomes.sql), which
    lists it in `finished`;
    Procrastinate's own finish of that job is then a no-op.

    A fetched job's claimed row goes to the run beside the job, in `claims`,
    not in the arguments of Procrastinate's Job: Procrastinate renders a job's
    arguments (attrs' asdict, recursively, and a repr) four times per job for
    its log lines, whether or not they are logged, and the claimed row, one
    nested object of twenty fields, made that a tenth of a worker's CPU in a
    drain of no-op tasks.
    """

    def __init__(
        self,
        connector: procrastinate.PsycopgConnector,
        concurrency: int,
        lease: Lease,
        finished: set[int],
        abandoned: set[int],
    ):
        super().__init__(connector)
        self._concurrency = concurrency
        self._lease = lease
        self._finished = finished
        self._abandoned = abandoned
        self._unstarted: deque[jobs.Job] = deque()
        # A fetched job's claimed task row (None: nothing was claimable), until its run takes it.
        self.claims: dict[int, dict[str, Any] | None] = {}
        self._handed_out = 0
        self._fetch_failing = False
        self._stopping = False

    def stop_fetching(self) -> None:
        """The worker is stopping: hand out no more jobs, and give back at once any that a fetch still brings.

        Procrastinate starts a job that a fetch returns after its stop; and a
        job kept unstarted until the grace period ends is given back only if
        the database still answers then. Returned at once, while the fetch's
        own connection has just answered, it costs no attempt.
        """
        self._stopping = True

    async def register_worker(self) -> int:
        self._unstarted.clear()
        self.claims.clear()
        self._handed_out = 0
        return self._current_lease()

    async def update_heartbeat(self, worker_id: int) -> None:
        """The lease's own thread renews it."""

    async def fetch_job(self, queues: Iterable[str] | None, worker_id: int) -> jobs.Job | None:
        if self._stopping:
            await self._return_unstarted()
            return None
        if not self._unstarted:
            if not self._lease.valid():
                return None
            # The worker holds a slot for the job it asks for now: that one is free too.
            free = max(1, self._concurrency - self._handed_out)
            try:
                rows = await self.connector.execute_query_all_async(
                    query=db.query("jobs_fetch"), queues=queues, worker_id=self._current_lease(), how_many=free
                )
            except Exception as exc:  # Procrastinate wraps every database error in its own exception
                if not self._fetch_failing:
                    log.warning("fetch failed (%s); fetching again at the next notification or poll", db.describe_error(exc))
                self._fetch_failing = True
                return None
            if self._fetch_failing:
                log.info("fetching again")
                self._fetch_failing = False
            for row in rows:
                self.claims[row["id"]] = row["args"].pop("claimed", None)
                self._unstarted.append(jobs.Job.from_row(row))
            if self._stopping:
                await self._return_unstarted()
                return None
        if not self._unstarted:
            return None
        self._handed_out += 1
        return self._unstarted.popleft()

    async def finish_job(self, job: jobs.Job, status: jobs.Status, delete_job: bool) -> None:
        self._handed_out -= 1
        if job.id in self._finished:
            self._finished.discard(job.id)
            return
        if job.id in self._abandoned:
            # Kept doing until this process is gone (worker/main.py marks it).
            return
        await self._until_done(
            f"finishing job {job.id}", job.worker_id, lambda: super(JobManager, self).finish_job(job, status, delete_job)
        )

    async def listen_for_jobs(self, *, on_notification: Any, queues: Iterable[str] | None = None) -> None:
        delay = 0.1
        while True:
            try:
                await super().listen_for_jobs(on_notification=on_notification, queues=queues)
            except Exception as exc:  # Procrastinate wraps every database error in its own exception
                log.warning("listener: %s; listening again in %.1fs", db.describe_error(exc), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_SECONDS)

    async def unregister_worker(self, worker_id: int) -> None:
        # Every started job has finished by now (Procrastinate waits for them
        # first). The lease itself is given up by the worker process, once
        # the last of its runs has ended (worker/main.py).
        await self._return_unstarted()

    async def _return_unstarted(self) -> None:
        if not self._unstarted:
            return
        job_ids = [job.id for job in self._unstarted]
        self._unstarted.clear()
        for job_id in job_ids:
            self.claims.pop(job_id, None)
        row = await self._until_done(
            "returning unstarted jobs",
            self._lease.worker_id,
            lambda: self.connector.execute_query_one_async(query=db.query("jobs_return"), job_ids=job_ids),
        )
        if row is not None:
            log.warning("stopping: returned %s fetched task(s) that had not started", row["returned"])

    def _current_lease(self) -> int:
        worker_id = self._lease.worker_id
        assert worker_id is not None, "the worker registers its lease before Procrastinate starts"
        return worker_id

    async def _until_done(self, what: str, worker_id: int | None, attempt: Callable[[], Awaitable[Any]]) -> Any:
        """Run a write through a database outage, for as long as the lease it was made under is held.

        Once the lease is lost, the sweep has taken the job over: None.
        """
        delay = 0.1
        while True:
            try:
                return await attempt()
            except Exception as exc:  # Procrastinate wraps every database error in its own exception
                if not db.is_connection_error(exc):
                    log.warning("%s: %s; the sweep repairs what is left", what, db.describe_error(exc))
                    return None
                if worker_id != self._lease.worker_id:
                    log.warning("%s: the lease of worker %s was lost; left to the sweep", what, worker_id)
                    return None
                log.warning("%s: %s; retrying in %.1fs", what, db.describe_error(exc), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_SECONDS)


def build_app(runner: Runner, concurrency: int) -> procrastinate.App:
    # The connector gets its pool from App.open_async(pool): one pool per process,
    # shared by Procrastinate and the runner.
    app = procrastinate.App(connector=procrastinate.PsycopgConnector())
    job_manager = JobManager(app.connector, concurrency, runner.lease, runner.finished_jobs, runner.abandoned_jobs)
    app.job_manager = job_manager

    @app.task(name=TASK_NAME, queue=QUEUE, pass_context=True)
    async def run_task(context: procrastinate.JobContext, task_id: str, owner: int | None = None) -> None:
        # `owner` is there for the fetch to be fair; the claimed row says all the run needs.
        claimed = job_manager.claims.pop(context.job.id, None)
        await runner.run_interruptible(task_id, claimed, context.job.id, context.job.worker_id)

    return app
