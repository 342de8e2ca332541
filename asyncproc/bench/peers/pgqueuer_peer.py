"""PgQueuer 1.6 on asyncpg: the no-op task, its worker and its producers (run in its virtualenv)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from asyncproc.bench.peers import common

ENTRYPOINT = "noop"
# PgQueuer's default batch size; a no-op handler never holds the worker's concurrency.
BATCH_SIZE = 10


async def install(options: common.Options) -> None:
    import asyncpg
    from pgqueuer import Queries

    connection = await asyncpg.connect(options.target)
    try:
        await Queries.from_asyncpg_connection(connection).install()
    finally:
        await connection.close()


async def preload(options: common.Options) -> None:
    import asyncpg
    from pgqueuer import Queries

    connection = await asyncpg.connect(options.target)
    try:
        # Its batch form of enqueue: one statement for the whole list.
        await Queries.from_asyncpg_connection(connection).enqueue(
            [ENTRYPOINT] * options.count, [None] * options.count, [0] * options.count)
    finally:
        await connection.close()


async def work(options: common.Options, stop: asyncio.Event) -> None:
    import asyncpg
    from pgqueuer import QueueManager, Queries

    connection = await asyncpg.connect(options.target)
    manager = QueueManager(Queries.from_asyncpg_connection(connection))

    @manager.entrypoint(ENTRYPOINT)
    async def noop(job) -> None:
        common.record(options, json.loads(job.payload) if job.payload else None)

    async def stop_on_signal() -> None:
        await stop.wait()
        manager.shutdown.set()

    stopper = asyncio.create_task(stop_on_signal())
    common.mark_ready(options)
    await manager.run(batch_size=BATCH_SIZE)
    stopper.cancel()


@contextlib.asynccontextmanager
async def enqueuer(options: common.Options):
    import asyncpg
    from pgqueuer import Queries

    pool = await asyncpg.create_pool(options.target, min_size=options.producers, max_size=options.producers)
    queries = Queries.from_asyncpg_pool(pool)

    async def enqueue(payload: dict[str, Any]) -> None:
        await queries.enqueue(ENTRYPOINT, json.dumps(payload).encode() if payload else None)

    try:
        yield enqueue
    finally:
        await pool.close()


if __name__ == "__main__":
    common.main(common.Peer(install, preload, work, enqueuer))
