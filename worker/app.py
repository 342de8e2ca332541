"""The Procrastinate app and the one task it knows.

Every ledger task is dispatched as a Procrastinate job named `asyncproc.run_task`
whose only argument is the task id (see migrations/0002); fetching the job
claims the task and adds the claimed row as `claimed` (migrations/0006_claim_on_fetch.sql). The
name is stable: renaming it would orphan queued jobs.
"""

from __future__ import annotations

import procrastinate

from worker.runner import Runner

TASK_NAME = "asyncproc.run_task"
QUEUE = "asyncproc"


def build_app(runner: Runner) -> procrastinate.App:
    # The connector gets its pool from App.open_async(pool): one pool per process,
    # shared by Procrastinate and the runner.
    app = procrastinate.App(connector=procrastinate.PsycopgConnector())

    @app.task(name=TASK_NAME, queue=QUEUE)
    async def run_task(task_id: str, claimed: dict | None) -> None:
        await runner.run_interruptible(task_id, claimed)

    return app
