"""Who is calling, and may they call now: API keys (ASYNCPROC_AUTH=required)
and per-client rate limits (ASYNCPROC_RATE_LIMIT_*), checked before every route
except the open ones."""

from __future__ import annotations

from flask import Flask, g, request

from asyncproc import keys, ratelimit
from asyncproc.api import resources
from asyncproc.db import translate_errors
from asyncproc.errors import RateLimited, Unauthorized

# /health for probes and load balancers, /openapi.json for clients.
OPEN_ENDPOINTS = frozenset({"asyncproc.health", "openapi"})


def init_app(app: Flask) -> None:
    app.before_request(_admit)


def current_owner() -> int | None:
    """The calling key's id, for service functions' `owner`; None when access control is off."""
    return g.get("owner")


def _admit() -> None:
    if request.endpoint in OPEN_ENDPOINTS:
        return
    settings = resources().settings
    if settings.auth_required:
        g.owner = _authenticate()
    if settings.rate_limit_per_second is not None:
        _take_token(settings.rate_limit_per_second, settings.rate_limit_burst)


def _authenticate() -> int:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("Send an API key: Authorization: Bearer <key>", invalid_token=False)
    with translate_errors(), resources().pool.connection() as conn:
        owner = keys.verify(conn, key.strip())
    if owner is None:
        raise Unauthorized("The API key is unknown or revoked", invalid_token=True)
    return owner


def _take_token(rate: float, burst: int) -> None:
    owner = current_owner()
    bucket = f"key:{owner}" if owner is not None else f"addr:{request.remote_addr}"
    with translate_errors(), resources().pool.connection() as conn:
        decision = ratelimit.take(conn, bucket, rate, burst)
    if not decision.allowed:
        raise RateLimited(
            f"Too many requests; retry in {decision.retry_after}s", retry_after=decision.retry_after
        )
