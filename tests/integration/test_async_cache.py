"""The worker's cache writes: written behind, gathered into one Redis pipeline, never waited for."""

from __future__ import annotations

import asyncio
import socket
import uuid
from datetime import datetime, timedelta, timezone

from asyncproc.cache import AsyncResultCache, ResultCache, version_of
from asyncproc.embedded import free_port

T1 = datetime(2030, 1, 1, tzinfo=timezone.utc)


def test_every_write_is_in_redis_once_flushed(redis_url):
    reader = ResultCache(redis_url, 60)
    ids = [uuid.uuid4() for _ in range(1200)]

    async def main() -> list:
        cache = AsyncResultCache(redis_url, 60)
        try:
            await asyncio.gather(*(cache.put(task_id, f'"{task_id}"'.encode(), T1) for task_id in ids))
            await cache.flush()
            return [reader.get(task_id) for task_id in ids]
        finally:
            await cache.close()

    assert asyncio.run(main()) == [f'"{task_id}"'.encode() for task_id in ids]


def test_a_put_gathered_with_a_newer_invalidation_keeps_the_version_rule(redis_url):
    reader = ResultCache(redis_url, 60)
    task_id = uuid.uuid4()

    async def main() -> None:
        cache = AsyncResultCache(redis_url, 60)
        try:
            await cache.invalidate(task_id, version_of(T1 + timedelta(seconds=1)))
            await cache.put(task_id, b'{"status":"failed"}', T1)
            await cache.flush()
        finally:
            await cache.close()

    asyncio.run(main())
    assert reader.get(task_id) is None


def test_a_cache_that_does_not_answer_never_fails_its_callers():
    async def main() -> None:
        cache = AsyncResultCache(f"redis://127.0.0.1:{free_port()}/0", 60, socket_timeout=0.2)
        try:
            await asyncio.wait_for(
                asyncio.gather(*(cache.invalidate(uuid.uuid4(), 5) for _ in range(50))), timeout=10
            )
        finally:
            await cache.close()

    asyncio.run(main())


def test_a_write_never_waits_for_redis():
    """A Redis that accepts connections and never answers: the callers go on at once; close() gives up after the socket timeout."""
    silent = socket.create_server(("127.0.0.1", 0))
    port = silent.getsockname()[1]

    async def main() -> None:
        cache = AsyncResultCache(f"redis://127.0.0.1:{port}/0", 60, socket_timeout=0.5)
        try:
            # Well within the socket timeout: neither call touched the network.
            await asyncio.wait_for(cache.invalidate(uuid.uuid4(), 5), timeout=0.25)
            await asyncio.wait_for(cache.put(uuid.uuid4(), b"{}", T1), timeout=0.25)
        finally:
            await asyncio.wait_for(cache.close(), timeout=10)

    try:
        asyncio.run(main())
    finally:
        silent.close()


def test_a_close_writes_what_is_still_queued(redis_url):
    reader = ResultCache(redis_url, 60)
    task_id = uuid.uuid4()

    async def main() -> None:
        cache = AsyncResultCache(redis_url, 60)
        await cache.put(task_id, b'{"status":"completed"}', T1)
        await cache.close()

    asyncio.run(main())
    assert reader.get(task_id) == b'{"status":"completed"}'
