"""A plain Procrastinate worker with a no-op task, to compare with ours.

Run as `python plain_procrastinate_worker.py DATABASE_URL`; it processes the
queue `plain` until it stops, on its own or by a signal. Its pool waits 2 s for
a connection, like the fault tests' asyncproc worker (ASYNCPROC_DB_CONNECT_TIMEOUT).
"""

from __future__ import annotations

import logging
import sys

import procrastinate

QUEUE = "plain"

POOL_TIMEOUT_SECONDS = 2

app = procrastinate.App(
    connector=procrastinate.PsycopgConnector(
        conninfo=sys.argv[1] if len(sys.argv) > 1 else "", timeout=POOL_TIMEOUT_SECONDS
    )
)


@app.task(name="plain.noop", queue=QUEUE)
def noop() -> None:
    return None


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    app.run_worker(queues=[QUEUE], wait=True, listen_notify=True, fetch_job_polling_interval=0.2, delete_jobs="never")
