"""Procrastinate alone, the version asyncproc runs on: the no-op task, its worker and its producers."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from asyncproc.bench.peers import common

QUEUE = "peer"


def _app(options: common.Options, pool_size: int):
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(
        conninfo=options.target, min_size=1, max_size=pool_size))

    @app.task(name="noop", queue=QUEUE)
    async def noop(**payload: Any) -> None:
        common.record(options, payload)

    return app, noop


async def install(options: common.Options) -> None:
    app, _ = _app(options, 1)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()


async def preload(options: common.Options) -> None:
    app, noop = _app(options, 1)
    async with app.open_async():
        await noop.batch_defer_async(*[{}] * options.count)


async def work(options: common.Options, stop: asyncio.Event) -> None:
    app, _ = _app(options, options.concurrency + 1)
    async with app.open_async():
        worker = asyncio.create_task(app.run_worker_async(queues=[QUEUE], concurrency=options.concurrency,
                                                          install_signal_handlers=False))
        common.mark_ready(options)
        await stop.wait()
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker


@contextlib.asynccontextmanager
async def enqueuer(options: common.Options):
    app, noop = _app(options, options.producers)
    async with app.open_async():
        async def enqueue(payload: dict[str, Any]) -> None:
            await noop.defer_async(**payload)

        yield enqueue


if __name__ == "__main__":
    common.main(common.Peer(install, preload, work, enqueuer))
