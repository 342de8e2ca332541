"""What every peer module shares: its command line, the producers, and the handler's record.

Standard library only: this runs in each peer's virtualenv, under its Python.
A peer module gives `main` a Peer, and the bench calls it as

    python -m asyncproc.bench.peers.<peer> install|preload|worker|enqueue|paced TARGET ...

TARGET is the peer's database URL (Celery's: its Redis URL). Producers print
one JSON line on stdout; the worker runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

# The payload key of a task whose handler records its pickup latency.
ENQUEUED_AT = "t0"


@dataclass
class Options:
    target: str
    prefix: str  # Celery's Redis key prefix: the bench's keys, apart from anything else on that Redis
    concurrency: int
    ready: Path | None  # the worker creates this file once it takes tasks
    record: Path | None  # the worker appends each pickup latency here
    count: int
    producers: int
    seconds: float
    rate: float


@dataclass
class Peer:
    install: Callable[[Options], Awaitable[None]]
    preload: Callable[[Options], Awaitable[None]]
    # Runs the worker until the stop event is set; a synchronous peer's runs until SIGTERM.
    work: Callable[[Options, asyncio.Event], Awaitable[None]] | Callable[[Options], None]
    # A context manager: it opens what the producers need and gives them one call
    # that queues one task with the given payload, and closes it at the end.
    enqueuer: Callable[[Options], Any]
    # Celery's: its worker runs a loop of its own, and its enqueue call blocks, so
    # its producers are threads.
    synchronous: bool = False


def record(options: Options, payload: dict[str, Any] | None) -> None:
    """The handler's first line: the pickup latency of a task that carries its enqueue time."""
    if payload and ENQUEUED_AT in payload and options.record is not None:
        latency = time.time() - payload[ENQUEUED_AT]
        with options.record.open("a") as file:
            file.write(f"{latency}\n")


def mark_ready(options: Options) -> None:
    if options.ready is not None:
        options.ready.touch()


async def produce(enqueue: Callable[[dict[str, Any]], Awaitable[Any]], producers: int, seconds: float) -> dict[str, float]:
    """`producers` coroutines, each queueing one task per call until the deadline."""
    count = 0

    async def producer(deadline: float) -> None:
        nonlocal count
        while time.monotonic() < deadline:
            await enqueue({})
            count += 1

    started = time.monotonic()
    await asyncio.gather(*(producer(started + seconds) for _ in range(producers)))
    return {"count": count, "seconds": time.monotonic() - started, "ended": time.time()}


async def paced(enqueue: Callable[[dict[str, Any]], Any], rate: float, seconds: float) -> dict[str, float]:
    """One task every 1/rate seconds, each carrying the moment its enqueue call began."""
    started = time.monotonic()
    count = 0
    while count < rate * seconds:
        await asyncio.sleep(max(0.0, started + count / rate - time.monotonic()))
        queued = enqueue({ENQUEUED_AT: time.time()})
        if inspect.isawaitable(queued):
            await queued
        count += 1
    return {"count": count, "seconds": time.monotonic() - started, "ended": time.time()}


def produce_in_threads(enqueue: Callable[[dict[str, Any]], Any], producers: int, seconds: float) -> dict[str, float]:
    """produce() for a synchronous enqueue call: one thread per producer."""
    counts = [0] * producers

    def producer(index: int, deadline: float) -> None:
        while time.monotonic() < deadline:
            enqueue({})
            counts[index] += 1

    started = time.monotonic()
    threads = [threading.Thread(target=producer, args=(i, started + seconds)) for i in range(producers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"count": sum(counts), "seconds": time.monotonic() - started, "ended": time.time()}


def _options(argv: list[str]) -> tuple[str, Options]:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["install", "preload", "worker", "enqueue", "paced"])
    parser.add_argument("target")
    parser.add_argument("--prefix", default="")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--ready", type=Path)
    parser.add_argument("--record", type=Path)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--producers", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--rate", type=float, default=5.0)
    args = parser.parse_args(argv)
    return args.command, Options(args.target, args.prefix, args.concurrency, args.ready, args.record,
                                 args.count, args.producers, args.seconds, args.rate)


async def _work_until_term(peer: Peer, options: Options) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await peer.work(options, stop)


async def _enqueue(peer: Peer, command: str, options: Options) -> dict[str, float]:
    async with peer.enqueuer(options) as enqueue:
        if command == "paced":
            return await paced(enqueue, options.rate, options.seconds)
        return await produce(enqueue, options.producers, options.seconds)


def _enqueue_synchronously(peer: Peer, command: str, options: Options) -> dict[str, float]:
    with peer.enqueuer(options) as enqueue:
        if command == "paced":
            return asyncio.run(paced(enqueue, options.rate, options.seconds))
        return produce_in_threads(enqueue, options.producers, options.seconds)


def main(peer: Peer, argv: list[str] | None = None) -> None:
    command, options = _options(sys.argv[1:] if argv is None else argv)
    if command == "install":
        asyncio.run(peer.install(options))
    elif command == "preload":
        asyncio.run(peer.preload(options))
    elif command == "worker" and peer.synchronous:
        peer.work(options)
    elif command == "worker":
        asyncio.run(_work_until_term(peer, options))
    elif peer.synchronous:
        print(json.dumps(_enqueue_synchronously(peer, command, options)), flush=True)
    else:
        print(json.dumps(asyncio.run(_enqueue(peer, command, options))), flush=True)
