"""HTTP routes: parse the request, call the service, shape the response."""

from __future__ import annotations

import logging
import uuid
from typing import Any, AsyncIterator

from flask import Blueprint, Flask, Response, g, request

from asyncproc import quotas, service
from asyncproc.api import validation
from asyncproc.app_resources import resources
from asyncproc.api.asgi import LOOP_KEY, PARKED_KEY
from asyncproc.api.auth import client_address, current_owner, current_quota
from asyncproc.config import CallbackSettings
from asyncproc.errors import InvalidRequest, UnsupportedMediaType
from asyncproc.logs import request_id_var
from asyncproc.waiting import Parked, run_blocking

log = logging.getLogger(__name__)
bp = Blueprint("asyncproc", __name__)

JSON = "application/json"


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
    app.before_request(_start_request)
    app.after_request(_finish_request)
    app.teardown_request(_forget_request)


def _start_request() -> None:
    sent = request.headers.get("X-Request-ID")
    g.request_id = sent if sent and validation.HEADER_VALUE.match(sent) else uuid.uuid4().hex
    request_id_var.set(g.request_id)


def _finish_request(response: Response) -> Response:
    response.headers["X-Request-ID"] = g.get("request_id", "-")
    return response


def _forget_request(_error: BaseException | None) -> None:
    # A server thread serves many requests: the next line it logs is no longer this one's.
    request_id_var.set("-")


@bp.post("/process")
def process():
    if request.mimetype != JSON:
        raise UnsupportedMediaType("Send the body as application/json")
    res = resources()
    body = validation.parse_json_body(request.get_data())
    new = validation.new_task(
        body,
        idempotency_key=validation.header_token(request.headers.get("Idempotency-Key"), "Idempotency-Key"),
        request_id=g.request_id,
        owner=current_owner(),
        **_callback_policy(res.callbacks),
    )
    quotas.check_request(current_quota(), [body])
    task, created = service.enqueue(res.pool, res.inserts, new, current_quota())
    if created:
        log.info("queued task %s (%s)", task.task_id, task.operation)
    body = {
        "task_id": str(task.task_id),
        "status": task.status,
        "message": "Task queued for processing" if created else "Task already exists for this Idempotency-Key",
    }
    headers = {"Location": f"/results/{task.task_id}"}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return body, 202 if created else 200, headers


@bp.post("/process/batch")
def process_batch():
    if request.mimetype != JSON:
        raise UnsupportedMediaType("Send the body as application/json")
    if "Idempotency-Key" in request.headers:
        # One key cannot name many tasks; retry safety for batches is the client's.
        raise InvalidRequest(
            "Idempotency-Key is not supported on /process/batch; send tasks one by one to use it",
            [{"field": "Idempotency-Key"}],
        )
    res = resources()
    body = validation.parse_json_body(request.get_data())
    batch = validation.new_tasks(
        body,
        request_id=g.request_id,
        owner=current_owner(),
        **_callback_policy(res.callbacks),
    )
    quotas.check_request(current_quota(), body["tasks"])
    task_ids = service.enqueue_batch(res.pool, batch, g.request_id, current_quota())
    log.info("queued a batch of %s tasks", len(task_ids))
    return {
        "tasks": [
            {"task_id": str(task_id), "status": "pending", "location": f"/results/{task_id}"}
            for task_id in task_ids
        ]
    }, 202


def _callback_policy(callbacks: CallbackSettings) -> dict[str, Any]:
    """Where callbacks may go, and whether this caller's can be signed: with its key's secret or the global one."""
    return {
        "callback_allow": callbacks.allow,
        "can_sign": current_owner() is not None or callbacks.secret is not None,
    }


@bp.get("/results/<raw_id>")
def results(raw_id: str):
    res = resources()
    task_id = validation.task_id(raw_id)
    wait = validation.wait_seconds(request.args.get("wait"))
    document, finished = service.lookup(res.pool, res.cache, task_id, owner=current_owner())
    if finished or not wait:
        return Response(document, mimetype=JSON)
    release = res.waiters.admit(_waiter_key())
    return _parked(res.waiters.wait_for_result(task_id, wait, current_owner()), release, JSON)


@bp.get("/results/<raw_id>/events")
def result_events(raw_id: str):
    return event_stream(validation.task_id(raw_id), current_owner())


def event_stream(task_id: uuid.UUID, owner: int | None) -> Response:
    """The task's changes as server-sent events; also the dashboard's live progress."""
    res = resources()
    # An unknown id fails here, as a JSON 404, before streaming starts.
    service.lookup(res.pool, res.cache, task_id, owner=owner)
    last_event_id = validation.header_token(request.headers.get("Last-Event-ID"), "Last-Event-ID")
    return parked_events(res.waiters.stream_changes(task_id, owner, last_event_id))


def parked_events(changes: AsyncIterator[bytes]) -> Response:
    """Server-sent events, parked like any waiting client and counted as one."""
    release = resources().waiters.admit(_waiter_key())
    response = _parked(changes, release, "text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    return response


def _waiter_key() -> str:
    owner = current_owner()
    return f"key:{owner}" if owner is not None else f"addr:{client_address()}"


def _parked(chunks, release, mimetype: str) -> Response:
    """A response whose body comes later: parked on the server's event loop
    when there is one (asyncproc.api.asgi), else produced on this thread.
    Until then, after_request hooks may wrap its chunks (see compat)."""
    parked = Parked(chunks, release)
    request.environ[PARKED_KEY] = parked
    if LOOP_KEY in request.environ:
        return Response(b"", mimetype=mimetype)
    return Response(run_blocking(parked), mimetype=mimetype)


@bp.get("/results/<raw_id>/callbacks")
def callbacks(raw_id: str):
    res = resources()
    return {"callbacks": service.callback_deliveries(res.pool, validation.task_id(raw_id), owner=current_owner())}


@bp.get("/results/<raw_id>/attempts")
def attempts(raw_id: str):
    res = resources()
    task_id = validation.task_id(raw_id)
    return {"task_id": str(task_id), "attempts": service.attempts(res.pool, task_id, owner=current_owner())}


@bp.post("/results/<raw_id>/retry")
def retry(raw_id: str):
    res = resources()
    task = service.retry(res.pool, res.cache, validation.task_id(raw_id), owner=current_owner())
    return Response(service.encode_document(task), status=202, mimetype=JSON)


@bp.post("/results/<raw_id>/cancel")
def cancel(raw_id: str):
    res = resources()
    task = service.cancel(res.pool, res.cache, validation.task_id(raw_id), owner=current_owner())
    return Response(service.encode_document(task), mimetype=JSON)


@bp.get("/health")
def health():
    res = resources()
    healthy, body = service.health(res.pool, res.cache, res.events)
    return body, 200 if healthy else 503
