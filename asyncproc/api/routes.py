"""HTTP routes: parse the request, call the service, shape the response."""

from __future__ import annotations

import logging
import uuid

from flask import Blueprint, Flask, Response, g, request

from asyncproc import service
from asyncproc.api import resources, validation
from asyncproc.api.auth import current_owner
from asyncproc.errors import InvalidRequest, UnsupportedMediaType
from asyncproc.logs import request_id_var

log = logging.getLogger(__name__)
bp = Blueprint("asyncproc", __name__)

JSON = "application/json"
SSE_KEEPALIVE_SECONDS = 15.0


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
    app.before_request(_start_request)
    app.after_request(_finish_request)


def _start_request() -> None:
    sent = request.headers.get("X-Request-ID")
    g.request_id = sent if sent and validation.HEADER_VALUE.match(sent) else uuid.uuid4().hex
    request_id_var.set(g.request_id)


def _finish_request(response: Response) -> Response:
    response.headers["X-Request-ID"] = g.get("request_id", "-")
    return response


@bp.post("/process")
def process():
    if request.mimetype != JSON:
        raise UnsupportedMediaType("Send the body as application/json")
    res = resources()
    new = validation.new_task(
        validation.parse_json_body(request.get_data()),
        default_max_attempts=service.DEFAULT_MAX_ATTEMPTS,
        idempotency_key=validation.header_token(request.headers.get("Idempotency-Key"), "Idempotency-Key"),
        request_id=g.request_id,
        owner=current_owner(),
    )
    task, created = service.enqueue(res.pool, new)
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
    batch = validation.new_tasks(
        validation.parse_json_body(request.get_data()),
        default_max_attempts=service.DEFAULT_MAX_ATTEMPTS,
        request_id=g.request_id,
        owner=current_owner(),
    )
    task_ids = service.enqueue_batch(res.pool, batch, g.request_id)
    log.info("queued a batch of %s tasks", len(task_ids))
    return {
        "tasks": [
            {"task_id": str(task_id), "status": "pending", "location": f"/results/{task_id}"}
            for task_id in task_ids
        ]
    }, 202


@bp.get("/results/<raw_id>")
def results(raw_id: str):
    res = resources()
    task_id = validation.task_id(raw_id)
    wait = validation.wait_seconds(request.args.get("wait"))
    if wait:
        document = service.wait_for_result(res.pool, res.cache, res.events, task_id, wait, owner=current_owner())
    else:
        document = service.result_document(res.pool, res.cache, task_id, owner=current_owner())
    return Response(document, mimetype=JSON)


@bp.get("/results/<raw_id>/events")
def result_events(raw_id: str):
    res = resources()
    changes = service.stream_changes(
        res.pool, res.cache, res.events, validation.task_id(raw_id), SSE_KEEPALIVE_SECONDS, owner=current_owner()
    )
    first = next(changes)  # an unknown id fails here, as a JSON 404, before streaming starts

    def stream():
        yield b"event: task\ndata: " + first + b"\n\n"
        for document in changes:
            yield b": keepalive\n\n" if document is None else b"event: task\ndata: " + document + b"\n\n"

    return Response(stream(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})


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
