"""The benchmark's handlers, loaded by its workers through ASYNCPROC_OPERATIONS_MODULE."""

from __future__ import annotations

import time

from asyncproc.operations import operation


@operation("bench.noop")
async def noop(payload, ctx):
    return None


@operation("bench.sync_noop")
def sync_noop(payload, ctx):
    # The default for a sync handler: a child process of the worker.
    return None


@operation("bench.thread_noop", isolation="thread")
def thread_noop(payload, ctx):
    return None


@operation("bench.stamp")
async def stamp(payload, ctx):
    # The wall-clock moment the handler started, for the dispatch latency.
    return time.time()
