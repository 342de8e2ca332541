"""Celery 5 with Redis as its broker, no result backend: the no-op task, its worker and its producers."""

from __future__ import annotations

import contextlib
from typing import Any

from asyncproc.bench.peers import common

QUEUE = "celery"
TASK = "noop"


def _app(options: common.Options):
    from celery import Celery

    app = Celery("peer", broker=options.target, set_as_current=True)
    # The bench's keys carry its prefix: the Redis may be one that other work uses.
    app.conf.broker_transport_options = {"global_keyprefix": options.prefix}
    app.conf.task_ignore_result = True
    app.conf.worker_hijack_root_logger = False

    @app.task(name=TASK)
    def noop(payload: dict[str, Any] | None = None) -> None:
        common.record(options, payload)

    return app, noop


async def install(options: common.Options) -> None:
    """Celery has no schema: its queue is a Redis list."""


async def preload(options: common.Options) -> None:
    _, noop = _app(options)
    with noop.app.producer_or_acquire() as producer:
        for _ in range(options.count):
            noop.apply_async(producer=producer)


def work(options: common.Options) -> None:
    from celery import signals

    app, _ = _app(options)
    signals.worker_ready.connect(lambda **_: common.mark_ready(options), weak=False)
    app.worker_main(["worker", "--concurrency", str(options.concurrency), "--queues", QUEUE, "--loglevel", "WARNING",
                     "--without-heartbeat", "--without-gossip", "--without-mingle"])


@contextlib.contextmanager
def enqueuer(options: common.Options):
    _, noop = _app(options)

    def enqueue(payload: dict[str, Any]) -> None:
        noop.apply_async(args=[payload] if payload else [])

    yield enqueue


if __name__ == "__main__":
    common.main(common.Peer(install, preload, work, enqueuer, synchronous=True))
