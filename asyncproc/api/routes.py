"""HTTP routes: parse the request, call the service, shape the response."""

from __future__ import annotations

import logging
import uuid

from flask import Blueprint, Flask, Response, g, request

from asyncproc import service
from asyncproc.api import resources, validation
from asyncproc.errors import InvalidRequest, UnsupportedMediaType
from asyncproc.logs import request_id_var

log = logging.getLogger(__name__)
bp = Blueprint("asyncproc", __name__)

JSON = "application/json"


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
    )
    task_ids = service.enqueue_batch(res.pool, batch, g.request_id)
    log.info("queued a batch of %s tasks", len(task_ids))
    return {
        "tasks": [
            {"task_id": str(task_id), "status": "pending", "location": f"/results/{task_id}"}
            for task_id in task_ids
        ]
    }, 202


@bp.get("/results/<path:raw_id>")
def results(raw_id: str):
    res = resources()
    document = service.result_document(res.pool, res.cache, validation.task_id(raw_id))
    return Response(document, mimetype=JSON)


@bp.get("/health")
def health():
    res = resources()
    healthy, body = service.health(res.pool, res.cache)
    return body, 200 if healthy else 503
