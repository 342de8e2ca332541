"""The few named errors of asyncproc, each with a stable code and an HTTP status."""

from __future__ import annotations

from typing import Any


# The stable code of each HTTP status that is not one of our own errors below:
# Flask's (404 for an unknown path, 405) and the HTTP server's (400, 414, 431
# before the app sees the request).
HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "body_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    429: "too_many_connections",
    431: "headers_too_large",
    500: "internal_error",
    501: "not_implemented",
    503: "unavailable",
}


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


class Forbidden(AsyncprocError):
    code = "forbidden"
    status = 403


class _RetryLater(AsyncprocError):
    def __init__(self, message: str, retry_after: int, details: Any = None):
        super().__init__(message, details)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class RateLimited(_RetryLater):
    code = "rate_limited"
    status = 429

    def __init__(self, message: str, retry_after: int):
        super().__init__(message, retry_after, details={"retry_after": retry_after})


class BatchTooLarge(AsyncprocError):
    code = "batch_too_large"
    status = 413


class BodyTooLarge(AsyncprocError):
    code = "body_too_large"
    status = 413


class RequestTimeout(AsyncprocError):
    code = "request_timeout"
    status = 408


class TooManyWaiters(_RetryLater):
    """This key holds as many long polls and event streams as it may."""

    code = "too_many_waiters"
    status = 429


class WaitersFull(_RetryLater):
    """This API process holds as many long polls and event streams as it may."""

    code = "waiters_full"
    status = 503


class QuotaExceeded(AsyncprocError):
    code = "quota_exceeded"
    status = 429
