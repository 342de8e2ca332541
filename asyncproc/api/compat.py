"""ASYNCPROC_COMPAT=seed: the seed's HTTP contract, for clients written against the seed.

It reshapes responses on their way out, after routes, the cache and the error
handlers have done their work, so that nothing else in asyncproc knows about it:
the tasks table, the SQL, the cache and the CLI keep asyncproc's five statuses.
Only the seed's three routes (POST /process, GET /results/{id}, GET /health) and
every error answer in the seed's shapes; asyncproc's own routes (batch, events,
retry, cancel, metrics, openapi) keep theirs, since no seed client calls them.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, AsyncIterator

from flask import Flask, Response, request

from asyncproc.api.asgi import PARKED_KEY
from asyncproc.config import ApiSettings

# The seed documents three statuses; a claimed task is still "pending" to it,
# and a cancelled one did not complete.
SEED_STATUSES = {"running": "pending", "cancelled": "failed"}
CANCELLED_MESSAGE = "Task was cancelled"
TIMESTAMP_FIELDS = ("created_at", "completed_at", "started_at", "scheduled_at")
SEED_ENDPOINTS = frozenset({"asyncproc.process", "asyncproc.results", "asyncproc.health"})
# FastAPI's wording of its 404, which the seed's clients match on.
TASK_NOT_FOUND = "Task not found"


def init_app(app: Flask, settings: ApiSettings) -> None:
    if settings.compat == "seed":
        app.after_request(_to_seed)


def _to_seed(response: Response) -> Response:
    parked = request.environ.get(PARKED_KEY)
    if parked is not None:
        # A long poll's document comes later (asyncproc.waiting): reshape it then.
        if request.endpoint == "asyncproc.results":
            parked.chunks = _seed_documents(parked.chunks)
        return response
    if response.mimetype != "application/json" or response.is_streamed:
        return response
    if response.status_code < 400 and request.endpoint not in SEED_ENDPOINTS:
        return response
    body = json.loads(response.get_data())
    if response.status_code >= 400 and "error" in body:
        _set_json(response, {"detail": seed_detail(response.status_code, body["error"], _request_fields())})
    elif request.endpoint == "asyncproc.health":
        # 200 {"status": "ok"} or 503 {"status": "unavailable"}, without the parts.
        _set_json(response, {"status": body["status"]})
    elif request.endpoint == "asyncproc.process":
        response.status_code = 200
        _set_json(response, {**body, "status": SEED_STATUSES.get(body["status"], body["status"])})
    elif request.endpoint == "asyncproc.results":
        _set_json(response, seed_task(body))
    return response


async def _seed_documents(documents: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async for document in documents:
            yield json.dumps(seed_task(json.loads(document)), separators=(",", ":")).encode()
    finally:
        await documents.aclose()


def _set_json(response: Response, body: Any) -> None:
    response.set_data(json.dumps(body, separators=(",", ":")))


def _request_fields() -> dict[str, str]:
    """Where a named field came from, for FastAPI's `loc`: a header, the query or the body."""
    fields = {name: "header" for name in request.headers.keys()}
    fields.update({name: "query" for name in request.args})
    return fields


def seed_task(document: dict[str, Any]) -> dict[str, Any]:
    """A task document as the seed's clients read it: three statuses, the seed's timestamps."""
    seed = dict(document)
    if document["status"] == "cancelled":
        last_error = document["error_message"]
        seed["error_message"] = CANCELLED_MESSAGE + (f" (last error: {last_error})" if last_error else "")
    seed["status"] = SEED_STATUSES.get(document["status"], document["status"])
    for name in TIMESTAMP_FIELDS:
        if seed.get(name) is not None:
            seed[name] = seed_timestamp(seed[name])
    return seed


def seed_timestamp(value: str) -> str:
    """The seed's README format: UTC, always six digits of microseconds, no offset
    (its column was a TIMESTAMP without time zone, which clients parse as naive)."""
    moment = datetime.fromisoformat(value).astimezone(timezone.utc)
    return moment.replace(tzinfo=None).isoformat(timespec="microseconds")


def seed_detail(status: int, error: dict[str, Any], sources: dict[str, str]) -> str | list[dict[str, Any]]:
    """FastAPI's `detail`: a list of problems for a 422, otherwise a string."""
    if error["code"] == "task_not_found":
        return TASK_NOT_FOUND
    if status != 422:
        return error["message"]
    details = error.get("details")
    prefix: list[Any] = []
    if isinstance(details, dict) and "index" in details:
        # A batch item's problems, located inside the batch.
        prefix = ["tasks", details["index"]]
        details = details.get("problems")
    if not details:
        return [{"type": "value_error", "loc": ["body", *prefix], "msg": error["message"]}]
    return [
        {
            "type": "value_error",
            "loc": _location(problem.get("field"), prefix, sources),
            "msg": problem.get("problem", error["message"]),
        }
        for problem in details
    ]


def _location(field: str | None, prefix: list[Any], sources: dict[str, str]) -> list[Any]:
    if field is None:
        return ["body", *prefix]
    source = sources.get(field, "body")
    return [source, field] if source != "body" else ["body", *prefix, *field.split(".")]
