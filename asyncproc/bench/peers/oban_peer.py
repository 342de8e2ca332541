"""Oban for Python 0.7 (Python 3.12): the no-op worker, its worker process and its producers."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from asyncproc.bench.peers import common

QUEUE = "default"
# Oban stages, prunes and elects a leader on its own connections beside the queue's.
SPARE_CONNECTIONS = 4
PRELOAD_CHUNK = 5000


def _worker_class(options: common.Options):
    from oban import worker

    @worker(queue=QUEUE)
    class Noop:
        async def process(self, job) -> None:
            common.record(options, job.args)

    return Noop


async def install(options: common.Options) -> None:
    from oban import Oban
    from oban.schema import install as install_schema

    pool = await Oban.create_pool(options.target, min_size=1, max_size=1)
    try:
        await install_schema(pool)
    finally:
        await pool.close()


async def preload(options: common.Options) -> None:
    from oban import Oban

    noop = _worker_class(options)
    pool = await Oban.create_pool(options.target, min_size=1, max_size=1)
    try:
        async with Oban(pool=pool) as oban:
            for start in range(0, options.count, PRELOAD_CHUNK):
                await oban.enqueue_many([noop.new({}) for _ in range(min(PRELOAD_CHUNK, options.count - start))])
    finally:
        await pool.close()


async def work(options: common.Options, stop: asyncio.Event) -> None:
    from oban import Oban

    _worker_class(options)
    size = options.concurrency + SPARE_CONNECTIONS
    pool = await Oban.create_pool(options.target, min_size=size, max_size=size)
    try:
        async with Oban(pool=pool, queues={QUEUE: options.concurrency}):
            common.mark_ready(options)
            await stop.wait()
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def enqueuer(options: common.Options):
    from oban import Oban

    noop = _worker_class(options)
    pool = await Oban.create_pool(options.target, min_size=options.producers, max_size=options.producers)
    try:
        async with Oban(pool=pool) as oban:
            async def enqueue(payload: dict[str, Any]) -> None:
                await oban.enqueue(noop.new(payload))

            yield enqueue
    finally:
        await pool.close()


if __name__ == "__main__":
    common.main(common.Peer(install, preload, work, enqueuer))
