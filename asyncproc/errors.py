"""The few named errors of asyncproc, each with a stable code and an HTTP status."""

from __future__ import annotations

from typing import Any


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    """The JSON of every error the API answers.

    `detail` repeats the message where a client written for FastAPI looks for it.
    """
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return {"error": error, "detail": message}


class ConfigError(Exception):
    """A bad environment variable; the message names it."""


class AsyncprocError(Exception):
    code = "internal_error"
    status = 500

    def __init__(self, message: str, details: Any = None):
        super().__init__(message)
        self.message = message
        self.details = details

    def headers(self) -> dict[str, str]:
        return {}

    def to_dict(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.details)


class InvalidRequest(AsyncprocError):
    code = "invalid_request"
    status = 422


class MalformedBody(AsyncprocError):
    code = "malformed_body"
    status = 400


class UnsupportedMediaType(AsyncprocError):
    code = "unsupported_media_type"
    status = 415


class TaskNotFound(AsyncprocError):
    code = "task_not_found"
    status = 404


class Conflict(AsyncprocError):
    code = "conflict"
    status = 409


class InvalidTransition(Conflict):
    code = "invalid_transition"


class DatabaseUnavailable(AsyncprocError):
    code = "database_unavailable"
    status = 503


class Unauthorized(AsyncprocError):
    code = "unauthorized"
    status = 401

    def __init__(self, message: str, invalid_token: bool):
        super().__init__(message)
        self.invalid_token = invalid_token

    def headers(self) -> dict[str, str]:
        challenge = 'Bearer realm="asyncproc"'
        if self.invalid_token:
            challenge += ', error="invalid_token"'
        return {"WWW-Authenticate": challenge}


class RateLimited(AsyncprocError):
    code = "rate_limited"
    status = 429

    def __init__(self, message: str, retry_after: int):
        super().__init__(message, details={"retry_after": retry_after})
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class BatchTooLarge(AsyncprocError):
    code = "batch_too_large"
    status = 413
