"""The Redis cache of finished results. It never raises to its callers.

Redis is only an accelerator: when it is unset, down or empty every read misses
and callers fall back to PostgreSQL. After a failure reads and puts stay off for
a short cool-down, so an outage costs one timeout per second, not one per
request. Invalidations are always tried: a missed one would serve a stale state.

Entries are versioned by the task's updated_at. An invalidation leaves a
tombstone with the version of the new state, and a put only replaces an older
version: a reader that read the row just before a change cannot put the old
state back after the change's invalidation.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from uuid import UUID

import redis
import redis.asyncio

log = logging.getLogger(__name__)

# v2: a hash {v: version, d: document}; "d" empty for a tombstone.
KEY_PREFIX = "asyncproc:result:v2:"
COOL_DOWN_SECONDS = 1.0
# A tombstone only has to outlive the readers that read the row before the
# change (each bounded by the statement timeout): a minute, not the result TTL.
TOMBSTONE_TTL_SECONDS = 60
# The most writes one pipeline carries to Redis.
MAX_PIPELINE = 500
# How long the worker gathers cache writes before it sends them.
LINGER_SECONDS = 0.005
# The most writes that wait for Redis; more are dropped.
MAX_WAITING = 20_000
# KEYS[1]: the entry; ARGV: version, document ("" for a tombstone), ttl.
_PUT_IF_NEWER = """
local current = redis.call('HGET', KEYS[1], 'v')
if current and tonumber(current) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'd', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def version_of(updated_at: datetime) -> int:
    """A task state's version: its updated_at in microseconds since the epoch,
    exactly as the tasks_notify_changed trigger computes it."""
    return (updated_at - _EPOCH) // timedelta(microseconds=1)


class _Breaker:
    """After a failure the cache is skipped for COOL_DOWN_SECONDS; logs each outage once."""

    def __init__(self) -> None:
        self._down_until = 0.0
        self._down = False
        self._lock = threading.Lock()

    def closed(self) -> bool:
        return time.monotonic() >= self._down_until

    def failed(self, action: str, exc: Exception) -> None:
        with self._lock:
            self._down_until = time.monotonic() + COOL_DOWN_SECONDS
            if not self._down:
                self._down = True
                log.warning("results cache unavailable (%s: %s); serving from PostgreSQL", action, exc)

    def succeeded(self) -> None:
        if self._down:
            with self._lock:
                if self._down:
                    self._down = False
                    log.info("results cache is back")


def _client_options(socket_timeout: float) -> dict:
    return {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        "socket_keepalive": True,
        "health_check_interval": 30,
    }


class ResultCache:
    def __init__(self, redis_url: str | None, ttl_seconds: int, socket_timeout: float = 0.25):
        self.ttl_seconds = ttl_seconds
        self._client: redis.Redis | None = None
        self._breaker = _Breaker()
        if redis_url is None:
            log.info("REDIS_URL is not set: the results cache is off")
            return
        self._client = redis.Redis.from_url(redis_url, **_client_options(socket_timeout))
        self._put_if_newer = self._client.register_script(_PUT_IF_NEWER)

    def _available(self) -> bool:
        return self._client is not None and self._breaker.closed()

    def get(self, task_id: UUID) -> bytes | None:
        if not self._available():
            return None
        try:
            value = self._client.hget(KEY_PREFIX + str(task_id), "d")
        except redis.RedisError as exc:
            self._breaker.failed("get", exc)
            return None
        self._breaker.succeeded()
        return value or None

    def put(self, task_id: UUID, document: bytes, updated_at: datetime) -> None:
        if not self._available():
            return
        self._put(task_id, version_of(updated_at), document, self.ttl_seconds, "put")

    def invalidate(self, task_id: UUID, version: int) -> None:
        """Forget the task's cached state, and refuse any put older than
        `version` (see version_of), the version of its new state."""
        if self._client is not None:
            self._put(task_id, version - 1, b"", TOMBSTONE_TTL_SECONDS, "invalidate")

    def _put(self, task_id: UUID, version: int, document: bytes, ttl: int, action: str) -> None:
        try:
            self._put_if_newer(keys=[KEY_PREFIX + str(task_id)], args=[version, document, ttl])
        except redis.RedisError as exc:
            self._breaker.failed(action, exc)
            return
        self._breaker.succeeded()

    def ping(self) -> str:
        """'ok', 'down' or 'disabled', for /health."""
        if self._client is None:
            return "disabled"
        try:
            self._client.ping()
        except redis.RedisError as exc:
            self._breaker.failed("ping", exc)
            return "down"
        self._breaker.succeeded()
        return "ok"


class AsyncResultCache:
    """The worker's writes to the same cache, on its event loop, written behind.

    A write is queued and the caller goes on: the writes of the next few
    milliseconds go to Redis in one pipeline. No run waits for the cache,
    which only ever holds a copy: a read that comes before a put lands misses
    and reads PostgreSQL, and the version rule orders writes whenever they
    land. A drain of no-op tasks spent a fifth of a worker's CPU in one Redis
    round trip per write, then, with the writes of one turn of the loop
    pipelined, still 18 %: runs start and finish a few at a time, and most
    pipelines carried one write.

    While Redis does not answer, puts are skipped (the breaker) and at most
    MAX_WAITING writes wait; beyond that a write is dropped, and logged once:
    a dropped invalidation leaves a stale entry until its TTL, as when the
    cache is down (asyncproc/cache.py's module docstring).
    """

    def __init__(self, redis_url: str | None, ttl_seconds: int, socket_timeout: float = 0.25):
        self.ttl_seconds = ttl_seconds
        self._client: redis.asyncio.Redis | None = None
        self._breaker = _Breaker()
        self._waiting: list[list] = []
        self._writer: asyncio.Task | None = None
        self._dropping = False
        if redis_url is None:
            log.info("REDIS_URL is not set: the results cache is off")
            return
        self._client = redis.asyncio.Redis.from_url(redis_url, **_client_options(socket_timeout))

    async def put(self, task_id: UUID, document: bytes, updated_at: datetime) -> None:
        if self._client is None or not self._breaker.closed():
            return
        self._queue(task_id, version_of(updated_at), document, self.ttl_seconds)

    async def invalidate(self, task_id: UUID, version: int) -> None:
        if self._client is not None:
            self._queue(task_id, version - 1, b"", TOMBSTONE_TTL_SECONDS)

    async def flush(self) -> None:
        """Return once every write queued so far has been tried."""
        while self._writer is not None:
            await asyncio.shield(self._writer)

    def _queue(self, task_id: UUID, version: int, document: bytes, ttl: int) -> None:
        if len(self._waiting) >= MAX_WAITING:
            if not self._dropping:
                log.warning("results cache: %s writes waiting for Redis; dropping writes until it catches up", MAX_WAITING)
            self._dropping = True
            return
        self._dropping = False
        self._waiting.append([KEY_PREFIX + str(task_id), version, document, ttl])
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_behind(), name="result-cache")

    async def _write_behind(self) -> None:
        try:
            while self._waiting:
                await asyncio.sleep(LINGER_SECONDS)
                batch = self._waiting[:MAX_PIPELINE]
                del self._waiting[:MAX_PIPELINE]
                await self._write(batch)
        finally:
            self._writer = None

    async def _write(self, batch: list[list]) -> None:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                # EVAL, not a registered script: a pipeline of those asks Redis
                # SCRIPT EXISTS first, a second round trip per pipeline.
                for key, *args in batch:
                    pipe.eval(_PUT_IF_NEWER, 1, key, *args)
                await pipe.execute()
        except (redis.RedisError, OSError) as exc:
            self._breaker.failed("write", exc)
        else:
            self._breaker.succeeded()

    async def close(self) -> None:
        if self._client is not None:
            await self.flush()
            await self._client.aclose()
