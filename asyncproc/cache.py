"""The Redis cache of finished results. It never raises to its callers.

Redis is only an accelerator: when it is unset, down or empty every read misses
and callers fall back to PostgreSQL. After a failure the cache stays off for a
short cool-down, so an outage costs one timeout per second, not one per request.
"""

from __future__ import annotations

import logging
import threading
import time
from uuid import UUID

import redis
import redis.asyncio

log = logging.getLogger(__name__)

KEY_PREFIX = "asyncproc:result:"
COOL_DOWN_SECONDS = 1.0


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

    def _available(self) -> bool:
        return self._client is not None and self._breaker.closed()

    def get(self, task_id: UUID) -> bytes | None:
        if not self._available():
            return None
        try:
            value = self._client.get(KEY_PREFIX + str(task_id))
        except redis.RedisError as exc:
            self._breaker.failed("get", exc)
            return None
        self._breaker.succeeded()
        return value

    def put(self, task_id: UUID, document: bytes) -> None:
        if not self._available():
            return
        try:
            self._client.set(KEY_PREFIX + str(task_id), document, ex=self.ttl_seconds)
        except redis.RedisError as exc:
            self._breaker.failed("put", exc)
            return
        self._breaker.succeeded()

    def invalidate(self, task_id: UUID) -> None:
        if not self._available():
            return
        try:
            self._client.delete(KEY_PREFIX + str(task_id))
        except redis.RedisError as exc:
            self._breaker.failed("invalidate", exc)
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
    """The worker's writes to the same cache, on its event loop: no thread hop per call."""

    def __init__(self, redis_url: str | None, ttl_seconds: int, socket_timeout: float = 0.25):
        self.ttl_seconds = ttl_seconds
        self._client: redis.asyncio.Redis | None = None
        self._breaker = _Breaker()
        if redis_url is None:
            log.info("REDIS_URL is not set: the results cache is off")
            return
        self._client = redis.asyncio.Redis.from_url(redis_url, **_client_options(socket_timeout))

    async def put(self, task_id: UUID, document: bytes) -> None:
        if self._client is None or not self._breaker.closed():
            return
        try:
            await self._client.set(KEY_PREFIX + str(task_id), document, ex=self.ttl_seconds)
        except (redis.RedisError, OSError) as exc:
            self._breaker.failed("put", exc)
            return
        self._breaker.succeeded()

    async def invalidate(self, task_id: UUID) -> None:
        if self._client is None or not self._breaker.closed():
            return
        try:
            await self._client.delete(KEY_PREFIX + str(task_id))
        except (redis.RedisError, OSError) as exc:
            self._breaker.failed("invalidate", exc)
            return
        self._breaker.succeeded()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
