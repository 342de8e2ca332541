"""GET /openapi.json: the OpenAPI 3.1 description of this API. Its request
bodies are asyncproc.contract's schemas, which the API validates with, and
each operation's input_schema is the one its input is checked against."""

from __future__ import annotations

from typing import Any

from flask import Flask

from asyncproc import contract
from asyncproc.api import validation
from asyncproc.config import ApiSettings
from asyncproc.operations import Registry, registry

JSON = "application/json"


def init_app(app: Flask) -> None:
    document = build(app.extensions["asyncproc"].api, registry)
    app.add_url_rule("/openapi.json", "openapi", lambda: document)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {JSON: {"schema": _ref("Error")}}}
    if headers:
        response["headers"] = headers
    return response


def _schemas(operations: Registry) -> dict[str, Any]:
    nullable_time = {"type": ["string", "null"], "format": "date-time"}
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "required": ["error", "detail"],
            "additionalProperties": False,
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "additionalProperties": False,
                    "properties": {
                        "code": {"type": "string", "description": "stable, machine-readable"},
                        "message": {"type": "string", "description": "for humans"},
                        "details": {"description": "what exactly is wrong, e.g. [{\"field\": \"data.n\", ...}]"},
                    },
                },
                "detail": {"type": "string", "description": "the message again, where FastAPI clients look for it"},
            },
        },
        "ProcessRequest": contract.process_request(operations.names()),
        "Accepted": {
            "type": "object",
            "required": ["task_id", "status", "message"],
            "additionalProperties": False,
            "properties": {
                "task_id": {"type": "string", "format": "uuid"},
                "status": {"type": "string"},
                "message": {"type": "string"},
            },
        },
        "Task": {
            "type": "object",
            "required": [
                "task_id", "status", "result", "error_message", "created_at", "completed_at", "operation",
                "attempts", "max_attempts", "started_at", "scheduled_at", "progress",
            ],
            "properties": {
                "task_id": {"type": "string", "format": "uuid"},
                "status": {"type": "string", "enum": ["pending", "running", "completed", "failed", "cancelled"]},
                "result": {"description": "the handler's return value; null until completed"},
                "error_message": {"type": ["string", "null"]},
                "created_at": {"type": "string", "format": "date-time"},
                "completed_at": nullable_time,
                "operation": {"type": "string"},
                "attempts": {"type": "integer", "minimum": 0},
                "max_attempts": {"type": "integer", "minimum": 1},
                "started_at": nullable_time,
                "scheduled_at": {"type": "string", "format": "date-time"},
                "progress": {"type": ["integer", "null"], "minimum": 0, "maximum": 100},
                "progress_message": {"type": ["string", "null"]},
                "wait_reason": {
                    "type": ["string", "null"],
                    "description": "why a pending task is held back by its operation's limits",
                },
            },
        },
        "Attempt": {
            "type": "object",
            "required": ["attempt", "worker_id", "host", "pid", "started_at", "finished_at", "outcome", "error", "counted"],
            "properties": {
                "attempt": {"type": "integer", "minimum": 1},
                "worker_id": {"type": ["integer", "null"]},
                "host": {"type": ["string", "null"]},
                "pid": {"type": ["integer", "null"]},
                "started_at": {"type": "string", "format": "date-time"},
                "finished_at": nullable_time,
                "outcome": {
                    "type": "string",
                    "enum": ["running", "completed", "failed", "retried", "cancelled", "interrupted", "lost"],
                },
                "error": {"type": ["string", "null"]},
                "counted": {"type": "boolean", "description": "false for a run given back at shutdown"},
            },
        },
        "CallbackDelivery": {
            "type": "object",
            "required": ["id", "url", "task_status", "state", "attempts", "next_attempt_at", "created_at",
                         "delivered_at", "last_error", "attempt_log"],
            "properties": {
                "id": {"type": "integer"},
                "url": {"type": "string"},
                "task_status": {"type": "string", "enum": ["completed", "failed", "cancelled"]},
                "state": {"type": "string", "enum": ["pending", "delivered", "failed"]},
                "attempts": {"type": "integer", "minimum": 0},
                "next_attempt_at": {"type": "string", "format": "date-time"},
                "created_at": {"type": "string", "format": "date-time"},
                "delivered_at": nullable_time,
                "last_error": {"type": ["string", "null"]},
                "attempt_log": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["attempted_at", "response_status", "error", "duration_ms"],
                        "properties": {
                            "attempted_at": {"type": "string"},
                            "response_status": {"type": ["integer", "null"]},
                            "error": {"type": ["string", "null"]},
                            "duration_ms": {"type": "integer"},
                        },
                    },
                },
            },
        },
        "Health": {
            "type": "object",
            "required": ["status", "database", "cache"],
            "properties": {
                "status": {"type": "string", "enum": ["ok", "unavailable"]},
                "database": {"type": "string", "enum": ["ok", "down"]},
                "cache": {"type": "string", "enum": ["ok", "down", "disabled"]},
            },
        },
    }
    for name, schema in operations.input_schemas().items():
        schemas[f"{name}.input"] = schema
    return schemas


def build(settings: ApiSettings, operations: Registry) -> dict[str, Any]:
    guarded: dict[str, Any] = {}
    if settings.auth_required:
        guarded["401"] = _error(
            "missing, unknown or revoked API key",
            {"WWW-Authenticate": {"schema": {"type": "string"}}},
        )
    if settings.rate_limit_per_second is not None:
        guarded["429"] = _error(
            "rate limit exceeded", {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
        )
    unavailable = {"503": _error("the database is unavailable; retry shortly")}
    retry_after = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
    waiting = {
        "429": _error("rate limit exceeded, or this client holds as many waiting requests as it may", retry_after),
        "503": _error("the database is unavailable, or this API process holds as many waiting requests as it may"),
    }
    security = {"security": [{"bearerAuth": []}]} if settings.auth_required else {}
    accepted_headers = {"Location": {"schema": {"type": "string"}, "description": "/results/{task_id}"}}
    task_id_parameter = {"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}}
    not_found = _error("no such task, a malformed id, or another key's task")
    paths = {
        "/process": {
            "post": {
                "operationId": "createTask",
                "summary": "Store and queue one task",
                **security,
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "pattern": validation.HEADER_VALUE.pattern},
                        "description": "a repeat with the same key and request returns the original task",
                    },
                    {
                        "name": "X-Request-ID",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "kept on the task; replaced when not 1-255 printable ASCII characters",
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {JSON: {"schema": _ref("ProcessRequest")}},
                },
                "responses": {
                    "202": {
                        "description": "stored and queued",
                        "headers": accepted_headers,
                        "content": {JSON: {"schema": _ref("Accepted")}},
                    },
                    "200": {
                        "description": "an Idempotency-Key repeat: the original task",
                        "headers": accepted_headers,
                        "content": {JSON: {"schema": _ref("Accepted")}},
                    },
                    "400": _error("the body is empty or not JSON"),
                    "409": _error("the Idempotency-Key was used for a different request"),
                    "413": _error(f"the body is over {settings.max_body_bytes} bytes"),
                    "415": _error("the body is not application/json"),
                    "422": _error("a field has a wrong type or value, the operation is unknown, "
                                  "or the input fails the operation's schema"),
                    **guarded,
                    **unavailable,
                },
            }
        },
        "/process/batch": {
            "post": {
                "operationId": "createTasks",
                "summary": f"Store and queue up to {contract.MAX_BATCH_TASKS} tasks in one transaction",
                **security,
                "requestBody": {
                    "required": True,
                    "content": {JSON: {"schema": contract.batch_request(_ref("ProcessRequest"))}},
                },
                "responses": {
                    "202": {
                        "description": "every task stored and queued, in request order",
                        "content": {
                            JSON: {
                                "schema": {
                                    "type": "object",
                                    "required": ["tasks"],
                                    "properties": {
                                        "tasks": {
                                            "type": "array",
                                            "items": {
                                                "type": "object",
                                                "required": ["task_id", "status", "location"],
                                                "properties": {
                                                    "task_id": {"type": "string", "format": "uuid"},
                                                    "status": {"type": "string", "enum": ["pending"]},
                                                    "location": {"type": "string"},
                                                },
                                            },
                                        }
                                    },
                                }
                            }
                        },
                    },
                    "400": _error("the body is empty or not JSON"),
                    "413": _error(f"the body is over {settings.max_body_bytes} bytes, or holds more than "
                                  f"{contract.MAX_BATCH_TASKS} tasks"),
                    "415": _error("the body is not application/json"),
                    "422": _error("an item is invalid (the message names its index), or an Idempotency-Key was sent"),
                    **guarded,
                    **unavailable,
                },
            }
        },
        "/results/{task_id}": {
            "get": {
                "operationId": "getTask",
                "summary": "A task's status and result",
                **security,
                "parameters": [
                    task_id_parameter,
                    {
                        "name": "wait",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "number", "minimum": 0, "maximum": validation.MAX_WAIT_SECONDS},
                        "description": "long poll: answer as soon as the task is finished, or after this many seconds",
                    },
                ],
                "responses": {
                    "200": {"description": "the task", "content": {JSON: {"schema": _ref("Task")}}},
                    "404": not_found,
                    "422": _error("wait is not a number of seconds from 0 to 60"),
                    **guarded,
                    **waiting,
                },
            }
        },
        "/results/{task_id}/events": {
            "get": {
                "operationId": "streamTask",
                "summary": "Server-Sent Events: the task on every status or progress change, until it is finished",
                **security,
                "parameters": [
                    task_id_parameter,
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "pattern": validation.HEADER_VALUE.pattern},
                        "description": "resume: the task is sent only if it changed since this event",
                    },
                ],
                "responses": {
                    "200": {
                        "description": "a stream of `event: task` with the task as `data` and an `id`, keepalive "
                        "comments, and `retry:` when it reaches ASYNCPROC_STREAM_MAX_SECONDS",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "404": not_found,
                    "422": _error("Last-Event-ID is not 1-255 printable ASCII characters"),
                    **guarded,
                    **waiting,
                },
            }
        },
        "/results/{task_id}/callbacks": {
            "get": {
                "operationId": "taskCallbacks",
                "summary": "The task's completion-webhook deliveries, each with every attempt",
                **security,
                "parameters": [task_id_parameter],
                "responses": {
                    "200": {
                        "description": "oldest first; empty when the task has no callback_url or is not finished",
                        "content": {
                            JSON: {
                                "schema": {
                                    "type": "object",
                                    "required": ["callbacks"],
                                    "properties": {"callbacks": {"type": "array", "items": _ref("CallbackDelivery")}},
                                }
                            }
                        },
                    },
                    "404": not_found,
                    **guarded,
                    **unavailable,
                },
            }
        },
        "/results/{task_id}/attempts": {
            "get": {
                "operationId": "taskAttempts",
                "summary": "Every run of the task, from the attempts ledger (SQL view asyncproc_task_attempts)",
                **security,
                "parameters": [task_id_parameter],
                "responses": {
                    "200": {
                        "description": "oldest first; empty while the task has never run",
                        "content": {
                            JSON: {
                                "schema": {
                                    "type": "object",
                                    "required": ["task_id", "attempts"],
                                    "properties": {
                                        "task_id": {"type": "string", "format": "uuid"},
                                        "attempts": {"type": "array", "items": _ref("Attempt")},
                                    },
                                }
                            }
                        },
                    },
                    "404": not_found,
                    **guarded,
                    **unavailable,
                },
            }
        },
        "/results/{task_id}/retry": {
            "post": {
                "operationId": "retryTask",
                "summary": "Re-queue a failed or cancelled task (SQL asyncproc_retry)",
                **security,
                "parameters": [task_id_parameter],
                "responses": {
                    "202": {"description": "queued again", "content": {JSON: {"schema": _ref("Task")}}},
                    "404": not_found,
                    "409": _error("the task is not failed or cancelled"),
                    **guarded,
                    **unavailable,
                },
            }
        },
        "/results/{task_id}/cancel": {
            "post": {
                "operationId": "cancelTask",
                "summary": "Cancel a pending task, or ask a running one to stop (SQL asyncproc_cancel)",
                **security,
                "parameters": [task_id_parameter],
                "responses": {
                    "200": {"description": "cancelled", "content": {JSON: {"schema": _ref("Task")}}},
                    "404": not_found,
                    "409": _error("the task is already finished"),
                    **guarded,
                    **unavailable,
                },
            }
        },
        "/health": {
            "get": {
                "operationId": "health",
                "summary": "Liveness and readiness; never needs a key",
                "responses": {
                    "200": {"description": "the database answers", "content": {JSON: {"schema": _ref("Health")}}},
                    "503": {"description": "the database does not answer", "content": {JSON: {"schema": _ref("Health")}}},
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics of every API process and of the ledger",
                **({"security": [{"bearerAuth": []}]} if settings.metrics_token else {}),
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **(
                        {"401": _error("missing or wrong ASYNCPROC_METRICS_TOKEN")}
                        if settings.metrics_token
                        else {"403": _error("a client not on this host, without ASYNCPROC_METRICS_TOKEN set")}
                    ),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document; never needs a key",
                "responses": {"200": {"description": "OpenAPI 3.1", "content": {JSON: {"schema": {"type": "object"}}}}},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "asyncproc",
            "version": "1",
            "description": "A task service whose queue is PostgreSQL. Every error is "
            '{"error": {"code", "message", "details"?}, "detail": message}; a wrong method is a 405 and an unknown path a 404.',
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(operations),
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "description": "asyncproc keys create NAME"}},
        },
    }
