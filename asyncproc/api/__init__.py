"""The Flask application factory."""

from __future__ import annotations

import logging

from flask import Flask, current_app, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from asyncproc.app_resources import Resources
from asyncproc.cache import ResultCache
from asyncproc.config import Settings
from asyncproc.db import open_pool
from asyncproc.errors import HTTP_CODES, AsyncprocError, ConfigError, error_body
from asyncproc.group_commit import GroupCommit
from asyncproc.operations import load_user_module
from asyncproc.task_events import TaskEvents
from asyncproc.waiting import Waiters

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> Flask:
    """Build the API. Call it in each process after fork: it opens the pool."""
    settings = settings or Settings.from_env()
    if settings.db.url is None:
        raise ConfigError("DATABASE_URL is not set (asyncproc up sets it for the embedded database)")
    # Operations are known here too, so that unknown ones and bad input are a 422.
    load_user_module(settings.operations_module)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.api.max_body_bytes
    app.json.sort_keys = False
    cache = ResultCache(settings.cache.url, settings.cache.result_ttl_seconds)
    # One connection per request thread; the waiters' few reads borrow from the same
    # pool, so that waiting adds nothing to docs/deployment.md's connection budget.
    pool = open_pool(settings.db, "asyncproc-api", settings.api.threads)
    # The group commit writes one statement at a time, through a connection of
    # its own: a pool hands its idle connections out in turn, so once a burst
    # had opened all of them, each write went through the one idle longest,
    # 0.2-0.3 ms more per POST (docs/performance.md, "Group commit").
    commits = open_pool(settings.db, "asyncproc-api", 1)
    events = TaskEvents(settings.db, cache).start()
    app.extensions["asyncproc"] = Resources(
        api=settings.api,
        callbacks=settings.callbacks,
        worker=settings.worker,
        pool=pool,
        commits=commits,
        inserts=GroupCommit(commits),
        cache=cache,
        events=events,
        waiters=Waiters(
            pool,
            cache,
            events,
            settings.api.max_waiters,
            settings.api.max_waiters_per_key,
            settings.api.stream_max_seconds,
        ),
    )

    from asyncproc import dashboard
    from asyncproc.api import auth, compat, metrics, openapi, routes

    routes.init_app(app)
    auth.init_app(app)
    openapi.init_app(app)
    metrics.init_app(app)
    compat.init_app(app, settings.api)
    dashboard.init_app(app)
    app.register_error_handler(AsyncprocError, _asyncproc_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    return app


def _asyncproc_error(error: AsyncprocError):
    level = logging.ERROR if error.status >= 500 and error.status != 503 else logging.WARNING
    log.log(level, "%s %s: %s", error.status, error.code, error.message)
    return error.to_dict(), error.status, error.headers()


def _http_error(error: HTTPException):
    status = error.code or 500
    log.warning("%s %s", status, error.name)
    body = error_body(HTTP_CODES.get(status, "http_error"), _http_message(error))
    response = error.get_response()
    response.data = current_app.json.dumps(body)
    response.content_type = "application/json"
    return response


def _http_message(error: HTTPException) -> str:
    """Werkzeug's sentences, reworded like our own messages: what and where."""
    if isinstance(error, NotFound):
        return f"No route {request.method} {request.path[:200]}; see /openapi.json"
    if isinstance(error, MethodNotAllowed):
        allowed = ", ".join(sorted(set(error.valid_methods or ()) - {"HEAD", "OPTIONS"}))
        return f"{request.method} is not allowed on {request.path[:200]}; use {allowed}"
    return error.description or error.name


def _unexpected_error(error: Exception):
    log.exception("unexpected error")
    return error_body("internal_error", "Internal error"), 500
