"""One event stream for many tasks: the task list follows its rows live.

A browser holds at most six connections to one server over HTTP/1.1, so a
page cannot open a stream per row. This merges the tasks' own streams (the
same events as GET /results/{id}/events) into one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

from asyncproc.errors import AsyncprocError
from asyncproc.waiting import KEEPALIVE_SECONDS

log = logging.getLogger(__name__)

KEEPALIVE = b": keepalive\n\n"


async def merged(streams: list[AsyncIterator[bytes]]) -> AsyncIterator[bytes]:
    """Every chunk of every stream as it comes, until all have ended; one
    keepalive at a time for the lot, rather than one per task."""
    chunks: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def pump(stream: AsyncIterator[bytes]) -> None:
        try:
            async for chunk in stream:
                await chunks.put(chunk)
        except AsyncprocError as error:
            # A task deleted meanwhile, say: its row stays as it was, the others go on.
            log.info("dashboard: a task's stream ended: %s", error.message)
        finally:
            await chunks.put(None)

    pumps = [asyncio.create_task(pump(stream)) for stream in streams]
    running = len(pumps)
    sent_at = time.monotonic()
    try:
        while running:
            chunk = await chunks.get()
            if chunk is None:
                running -= 1
            elif chunk != KEEPALIVE or time.monotonic() - sent_at >= KEEPALIVE_SECONDS:
                sent_at = time.monotonic()
                yield chunk
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
