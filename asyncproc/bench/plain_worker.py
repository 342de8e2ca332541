"""A plain Procrastinate worker running a no-op task: the reference for worker throughput.

Run as `python -m asyncproc.bench.plain_worker DATABASE_URL CONCURRENCY`. It uses
Procrastinate's defaults except for the queue and the concurrency, which match ours.
"""

from __future__ import annotations

import asyncio
import sys

import procrastinate

TASK_NAME = "bench.plain_noop"
QUEUE = "bench_plain"


def main(database_url: str, concurrency: int) -> None:
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=database_url))

    @app.task(name=TASK_NAME, queue=QUEUE)
    async def plain_noop() -> None:
        return None

    async def serve() -> None:
        async with app.open_async():
            await app.run_worker_async(queues=[QUEUE], concurrency=concurrency)

    asyncio.run(serve())


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
