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


class FairJobManager(manager.JobManager):
    """Procrastinate's job manager, fetching through asyncproc_fetch_job: fair between API keys."""

    async def fetch_job(self, queues: Iterable[str] | None, worker_id: int) -> jobs.Job | None:
        row = await self.connector.execute_query_one_async(
            query=db.query("job_fetch"), queues=queues, worker_id=worker_id
        )
        # A row of NULLs when nothing is due.
        if row["id"] is None:
            return None
        return jobs.Job.from_row(row)


def build_app(runner: Runner) -> procrastinate.App:
    # The connector gets its pool from App.open_async(pool): one pool per process,
    # shared by Procrastinate and the runner.
    app = procrastinate.App(connector=procrastinate.PsycopgConnector())
    app.job_manager = FairJobManager(connector=app.connector)

    @app.task(name=TASK_NAME, queue=QUEUE)
    async def run_task(task_id: str, claimed: dict | None, owner: int | None = None) -> None:
        # `owner` is there for the fetch to be fair; the claimed row says all the run needs.
        await runner.run_interruptible(task_id, claimed)

    return app
