"""The Procrastinate app and the one task it knows.

Every ledger task is dispatched as a Procrastinate job named `asyncproc.run_task`
whose arguments are the task id and, with access control on, its owner (see
migrations/0002 and 0015); fetching the job claims the task and adds the claimed
row as `claimed` (migrations/0006_claim_on_fetch.sql). The name is stable:
renaming it would orphan queued jobs.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Iterable

import procrastinate
from procrastinate import jobs, manager

from asyncproc import db
from worker.runner import Runner

log = logging.getLogger(__name__)

TASK_NAME = "asyncproc.run_task"
QUEUE = "asyncproc"


class JobManager(manager.JobManager):
    """Procrastinate's job manager, fetching several fair jobs per round trip and finishing completed ones in batches.

    Procrastinate's worker asks for one job per free slot, one round trip each.
    This one fetches a job for every free slot in one statement
    (asyncproc_fetch_jobs, migrations/0015 and 0017) and hands them out from a
    buffer: the worker takes them at once, since it only asks while it has a
    free slot, and the buffer never holds more than the free slots. Jobs still
    in the buffer when the worker stops were never started: they are returned
    (their tasks pending again, attempt not counted) before the worker
    unregisters. A completed task's job is finished by the statement that
    records the outcome (migrations/0016), which lists it in `finished`;
    Procrastinate's own finish of that job is then a no-op.
    """

    def __init__(self, connector: procrastinate.PsycopgConnector, concurrency: int, finished: set[int]):
        super().__init__(connector)
        self._concurrency = concurrency
        self._finished = finished
        self._unstarted: deque[jobs.Job] = deque()
        self._handed_out = 0

    async def register_worker(self) -> int:
        self._unstarted.clear()
        self._handed_out = 0
        return await super().register_worker()

    async def fetch_job(self, queues: Iterable[str] | None, worker_id: int) -> jobs.Job | None:
        if not self._unstarted:
            # The worker holds a slot for the job it asks for now: that one is free too.
            free = max(1, self._concurrency - self._handed_out)
            rows = await self.connector.execute_query_all_async(
                query=db.query("jobs_fetch"), queues=queues, worker_id=worker_id, how_many=free
            )
            self._unstarted.extend(jobs.Job.from_row(row) for row in rows)
        if not self._unstarted:
            return None
        self._handed_out += 1
        return self._unstarted.popleft()

    async def finish_job(self, job: jobs.Job, status: jobs.Status, delete_job: bool) -> None:
        self._handed_out -= 1
        if job.id in self._finished:
            self._finished.discard(job.id)
            return
        await super().finish_job(job, status, delete_job)

    async def unregister_worker(self, worker_id: int) -> None:
        # Every started job has finished by now (Procrastinate waits for them first).
        if self._unstarted:
            job_ids = [job.id for job in self._unstarted]
            self._unstarted.clear()
            row = await self.connector.execute_query_one_async(query=db.query("jobs_return"), job_ids=job_ids)
            log.warning("stopping: returned %s fetched task(s) that had not started", row["returned"])
        await super().unregister_worker(worker_id)


def build_app(runner: Runner, concurrency: int) -> procrastinate.App:
    # The connector gets its pool from App.open_async(pool): one pool per process,
    # shared by Procrastinate and the runner.
    app = procrastinate.App(connector=procrastinate.PsycopgConnector())
    app.job_manager = JobManager(app.connector, concurrency, runner.finished_jobs)

    @app.task(name=TASK_NAME, queue=QUEUE, pass_context=True)
    async def run_task(context: procrastinate.JobContext, task_id: str, claimed: dict | None,
                       owner: int | None = None) -> None:
        # `owner` is there for the fetch to be fair; the claimed row says all the run needs.
        await runner.run_interruptible(task_id, claimed, context.job.id)

    return app
