"""The worker's cache writes, gathered into one Redis pipeline per turn of its loop."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta, timezone

from asyncproc.cache import AsyncResultCache, ResultCache, version_of
from asyncproc.embedded import free_port

T1 = datetime(2030, 1, 1, tzinfo=timezone.utc)


def test_writes_made_together_are_each_done_when_their_caller_returns(redis_url):
    reader = ResultCache(redis_url, 60)
    ids = [uuid.uuid4() for _ in range(1200)]

    async def main() -> list:
        cache = AsyncResultCache(redis_url, 60)
        try:
            await asyncio.gather(*(cache.put(task_id, f'"{task_id}"'.encode(), T1) for task_id in ids))
            # What each caller saw when its call returned, read before anything else runs.
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
            await asyncio.gather(
                cache.invalidate(task_id, version_of(T1 + timedelta(seconds=1))),
                cache.put(task_id, b'{"status":"failed"}', T1),
            )
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
