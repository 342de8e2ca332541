"""Who is calling, and may they call now: API keys (ASYNCPROC_AUTH=required)
and rate limits (ASYNCPROC_RATE_LIMIT_*), checked before every route except
the open ones.

Without access control the rate limit is per client address. With it, the
limit is per key, taken after authentication, so that clients behind one
address do not share an allowance; and ASYNCPROC_ADDRESS_RATE_LIMIT_* is taken
per address before authentication, so that a flood of bad keys gets 429s
instead of a key lookup each.
"""

from __future__ import annotations

import hmac

from flask import Flask, g, request

from asyncproc import keys, ratelimit
from asyncproc.api import clients
from asyncproc.app_resources import resources
from asyncproc.db import translate_errors
from asyncproc.errors import Forbidden, RateLimited, Unauthorized
from asyncproc.quotas import NO_QUOTA, Quota

# /health for probes and load balancers, /openapi.json for clients.
OPEN_ENDPOINTS = frozenset({"asyncproc.health", "openapi"})
METRICS_ENDPOINT = "metrics.metrics"
# Each API process deletes the buckets that have refilled this often.
_pruning = ratelimit.PruneClock(60.0)


def init_app(app: Flask) -> None:
    app.before_request(_admit)


def current_owner() -> int | None:
    """The calling key's id, for service functions' `owner`; None when access control is off."""
    return g.get("owner")


def current_quota() -> Quota:
    """The calling key's quota; none when access control is off."""
    return g.get("quota", NO_QUOTA)


def client_address() -> str:
    """The client's address, read through ASYNCPROC_TRUSTED_PROXIES."""
    if "client_address" not in g:
        g.client_address = clients.client_address(
            request.remote_addr, request.headers.get("X-Forwarded-For"), resources().api.trusted_proxies
        )
    return g.client_address


def _admit() -> None:
    if request.endpoint in OPEN_ENDPOINTS:
        return
    if request.endpoint == METRICS_ENDPOINT:
        _admit_scraper()
        return
    settings = resources().api
    if not settings.auth_required:
        if settings.rate_limit_per_second is not None:
            _take_token(f"addr:{client_address()}", settings.rate_limit_per_second, settings.rate_limit_burst)
        return
    if settings.address_rate_limit_per_second is not None:
        _take_token(
            f"addr:{client_address()}", settings.address_rate_limit_per_second, settings.address_rate_limit_burst
        )
    if request.blueprint == "dashboard":
        return  # the dashboard signs its users in itself (asyncproc/dashboard/access.py)
    caller = _authenticate()
    g.owner, g.quota = caller.id, caller.quota
    if settings.rate_limit_per_second is not None:
        _take_token(f"key:{g.owner}", settings.rate_limit_per_second, settings.rate_limit_burst)


def _admit_scraper() -> None:
    """/metrics: with ASYNCPROC_METRICS_TOKEN only for that token, else only from this host."""
    token = resources().api.metrics_token
    if token is None:
        if not clients.is_loopback(client_address()):
            raise Forbidden("/metrics is served to this host only; set ASYNCPROC_METRICS_TOKEN to scrape it remotely")
        return
    scheme, _, sent = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(sent.strip().encode(), token.encode()):
        raise Unauthorized("Send the metrics token: Authorization: Bearer <ASYNCPROC_METRICS_TOKEN>", invalid_token=bool(sent))


def _authenticate() -> keys.Caller:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("Send an API key: Authorization: Bearer <key>", invalid_token=False)
    with translate_errors(), resources().pool.connection() as conn:
        caller = keys.verify(conn, key.strip())
    if caller is None:
        raise Unauthorized("The API key is unknown or revoked", invalid_token=True)
    return caller


def _take_token(bucket: str, rate: float, burst: int) -> None:
    with translate_errors(), resources().pool.connection() as conn:
        decision = ratelimit.take(conn, bucket, rate, burst)
        if _pruning.due():
            settings = resources().api
            ratelimit.prune(
                conn,
                [
                    (limit, size)
                    for limit, size in (
                        (settings.rate_limit_per_second, settings.rate_limit_burst),
                        (settings.address_rate_limit_per_second, settings.address_rate_limit_burst),
                    )
                    if limit is not None
                ],
            )
    if not decision.allowed:
        raise RateLimited(
            f"Too many requests; retry in {decision.retry_after}s", retry_after=decision.retry_after
        )
