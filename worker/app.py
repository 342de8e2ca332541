"""The Procrastinate app and the one task it knows.

Every ledger task is dispatched as a Procrastinate job named `asyncproc.run_task`
whose arguments are the task id and, with access control on, its owner (see
migrations/0002 and 0015); fetching the job claims the task and adds the claimed
row as `claimed` (migrations/0006_claim_on_fetch.sql). The name is stable:
renaming it would orphan queued jobs.
"""

from __future__ import annotations

from typing import Iterable

import procrastinate
from procrastinate import jobs, manager

from asyncproc import db
from worker.runner import Runner

TASK_NAME = "asyncproc.run_task"
QUEUE = "asyncproc"


class JobManager(manager.JobManager):
    """Procrastinate's job manager, fetching fairly between API keys and finishing completed jobs in batches.

    The fetch is asyncproc_fetch_job (migrations/0015). A completed task's job is
    finished by the statement that records the outcome (migrations/0016), which
    lists it in `finished`; Procrastinate's own finish of that job is then a no-op.
    """

    def __init__(self, connector: procrastinate.PsycopgConnector, finished: set[int]):
        super().__init__(connector)
        self._finished = finished

    async def fetch_job(self, queues: Iterable[str] | None, worker_id: int) -> jobs.Job | None:
        row = await self.connector.execute_query_one_async(
            query=db.query("job_fetch"), queues=queues, worker_id=worker_id
        )
        # A row of NULLs when nothing is due.
        if row["id"] is None:
            return None
        return jobs.Job.from_row(row)

    async def finish_job(self, job: jobs.Job, status: jobs.Status, delete_job: bool) -> None:
        if job.id in self._finished:
            self._finished.discard(job.id)
            return
        await super().finish_job(job, status, delete_job)


def build_app(runner: Runner) -> procrastinate.App:
    # The connector gets its pool from App.open_async(pool): one pool per process,
    # shared by Procrastinate and the runner.
    app = procrastinate.App(connector=procrastinate.PsycopgConnector())
    app.job_manager = JobManager(app.connector, runner.finished_jobs)

    @app.task(name=TASK_NAME, queue=QUEUE, pass_context=True)
    async def run_task(context: procrastinate.JobContext, task_id: str, claimed: dict | None,
                       owner: int | None = None) -> None:
        # `owner` is there for the fetch to be fair; the claimed row says all the run needs.
        await runner.run_interruptible(task_id, claimed, context.job.id)

    return app
