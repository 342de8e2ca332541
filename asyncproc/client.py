"""A Python client for the asyncproc HTTP API, built on requests.

    from asyncproc.client import Client

    client = Client("http://127.0.0.1:8000", api_key="apk_...")
    handle = client.submit("compute", n=1000)
    print(handle.result(timeout=30))       # 499500, or TaskFailed / TaskCancelled

Every submit carries an Idempotency-Key made for it, and the client's own
retries of that submit (connection errors, 429, 502-504) reuse the key, so a
retry never queues the task twice. Errors from the API become exceptions named
after its error codes (see ERRORS).
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime
from typing import Any, Iterable, Iterator

import requests
from urllib3.exceptions import NewConnectionError

# The API answers ?wait for at most this long (asyncproc/api/validation.py MAX_WAIT_SECONDS).
MAX_WAIT_SECONDS = 60
# The API's keepalive period on the event stream (asyncproc/waiting.py).
SSE_KEEPALIVE_SECONDS = 15
FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
_RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})


class AsyncprocClientError(Exception):
    """Anything the client raises on purpose."""


class APIError(AsyncprocClientError):
    """An error answer of the API: its HTTP status and its `{"error": {...}}` body."""

    code = "error"

    def __init__(self, status: int, code: str, message: str, details: Any = None, headers: Any = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = dict(headers or {})

    @property
    def retry_after(self) -> float | None:
        """The seconds the API asked to wait (Retry-After), if it did."""
        value = self.headers.get("Retry-After")
        return None if value is None else float(value)


class InvalidRequest(APIError):
    code = "invalid_request"


class MalformedBody(APIError):
    code = "malformed_body"


class UnsupportedMediaType(APIError):
    code = "unsupported_media_type"


class TaskNotFound(APIError):
    code = "task_not_found"


class Conflict(APIError):
    code = "conflict"


class InvalidTransition(Conflict):
    code = "invalid_transition"


class DatabaseUnavailable(APIError):
    code = "database_unavailable"


class Unauthorized(APIError):
    code = "unauthorized"


class Forbidden(APIError):
    code = "forbidden"


class RateLimited(APIError):
    code = "rate_limited"


class QuotaExceeded(APIError):
    code = "quota_exceeded"


class TooManyWaiters(APIError):
    code = "too_many_waiters"


class WaitersFull(APIError):
    code = "waiters_full"


class TooManyConnections(APIError):
    code = "too_many_connections"


class RequestTimeout(APIError):
    code = "request_timeout"


class UriTooLong(APIError):
    code = "uri_too_long"


class HeadersTooLarge(APIError):
    code = "headers_too_large"


class NotImplementedByAPI(APIError):
    code = "not_implemented"


class Unavailable(APIError):
    code = "unavailable"


class BatchTooLarge(APIError):
    code = "batch_too_large"


class BadRequest(APIError):
    code = "bad_request"


class NotFound(APIError):
    code = "not_found"


class MethodNotAllowed(APIError):
    code = "method_not_allowed"


class BodyTooLarge(APIError):
    code = "body_too_large"


class InternalError(APIError):
    code = "internal_error"


# Code -> exception; a test keeps it equal to the codes of asyncproc.errors and the API's HTTP errors.
ERRORS: dict[str, type[APIError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest, MalformedBody, UnsupportedMediaType, TaskNotFound, Conflict, InvalidTransition,
        DatabaseUnavailable, Unauthorized, Forbidden, RateLimited, QuotaExceeded, TooManyWaiters, WaitersFull,
        TooManyConnections, RequestTimeout, UriTooLong, HeadersTooLarge, BatchTooLarge, BadRequest, NotFound,
        MethodNotAllowed, BodyTooLarge, InternalError, NotImplementedByAPI, Unavailable,
    )
}


class TaskError(AsyncprocClientError):
    """A task that finished without a result; `document` is the task as GET /results shows it."""

    def __init__(self, document: dict[str, Any]):
        super().__init__(f"task {document['task_id']} {document['status']}: {document.get('error_message')}")
        self.document = document
        self.task_id = document["task_id"]
        self.error_message = document.get("error_message")


class TaskFailed(TaskError):
    pass


class TaskCancelled(TaskError):
    pass


class ResultTimeout(AsyncprocClientError, TimeoutError):
    """result(timeout=...) ran out before the task finished; `document` is its last state."""

    def __init__(self, document: dict[str, Any], timeout: float):
        super().__init__(f"task {document['task_id']} still {document['status']} after {timeout:g}s")
        self.document = document


def _api_error(response: requests.Response) -> APIError:
    try:
        error = response.json()["error"]
        code, message, details = error["code"], error["message"], error.get("details")
    except (ValueError, KeyError, TypeError):
        code, message, details = "error", response.text[:500] or response.reason, None
    cls = ERRORS.get(code, APIError)
    return cls(response.status_code, code, message, details, response.headers)


class TaskHandle:
    """One submitted task."""

    def __init__(self, client: "Client", task_id: str):
        self.client = client
        self.task_id = task_id

    def __repr__(self) -> str:
        return f"TaskHandle({self.task_id!r})"

    def get(self, wait: float = 0) -> dict[str, Any]:
        """The task's document; with `wait`, as soon as it is finished or after `wait` seconds."""
        params = {"wait": f"{wait:g}"} if wait else None
        # The answer may take `wait` seconds to come.
        timeout = (self.client.timeout, self.client.timeout + wait)
        return self.client._request("GET", f"/results/{self.task_id}", params=params, timeout=timeout).json()

    def status(self) -> str:
        return self.get()["status"]

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the task and return its result; TaskFailed, TaskCancelled or ResultTimeout otherwise."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = MAX_WAIT_SECONDS if deadline is None else max(0.0, deadline - time.monotonic())
            document = self.get(wait=min(remaining, MAX_WAIT_SECONDS))
            if document["status"] == "completed":
                return document["result"]
            if document["status"] == "failed":
                raise TaskFailed(document)
            if document["status"] == "cancelled":
                raise TaskCancelled(document)
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeout(document, timeout)

    def events(self) -> Iterator[dict[str, Any]]:
        """The task's document on every change (Server-Sent Events), ending once it is finished."""
        # The API sends a keepalive at least every SSE_KEEPALIVE_SECONDS, so a longer silence is a dead stream.
        timeout = (self.client.timeout, self.client.timeout + SSE_KEEPALIVE_SECONDS)
        path = f"/results/{self.task_id}/events"
        with self.client._request("GET", path, stream=True, timeout=timeout) as response:
            data: list[str] = []
            for line in response.iter_lines(decode_unicode=True):
                if line.startswith("data:"):
                    data.append(line[5:].lstrip())
                elif line == "" and data:
                    document = json.loads("\n".join(data))
                    data = []
                    yield document
                    if document["status"] in FINAL_STATUSES:
                        return

    def retry(self) -> dict[str, Any]:
        """Re-queue a failed or cancelled task; its document."""
        return self.client._request("POST", f"/results/{self.task_id}/retry").json()

    def cancel(self) -> dict[str, Any]:
        """Cancel a pending task, or ask a running one to stop; its document."""
        return self.client._request("POST", f"/results/{self.task_id}/cancel").json()


class Client:
    """The asyncproc API at `base_url`, with an API key when access control is on.

    `retries` bounds the client's own retries of one call on connection errors
    and on 429, 502, 503 and 504; they wait `backoff` seconds, doubling, or what
    Retry-After says.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.5,
        session: requests.Session | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.session = session or requests.Session()
        if api_key is not None:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def task(self, task_id: str) -> TaskHandle:
        """A handle on an existing task."""
        return TaskHandle(self, str(task_id))

    def submit(
        self,
        operation: str,
        /,
        *,
        data: dict[str, Any] | None = None,
        priority: int | None = None,
        run_at: datetime | str | None = None,
        delay_seconds: float | None = None,
        max_attempts: int | None = None,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
        **input: Any,
    ) -> TaskHandle:
        """Queue `operation` with `input` (plus `data`, for input fields named like an option)."""
        body = _task_body(operation, {**(data or {}), **input}, priority, run_at, delay_seconds, max_attempts, callback_url)
        key = idempotency_key or str(uuid.uuid4())
        response = self._request("POST", "/process", json=body, headers={"Idempotency-Key": key}, idempotent=True)
        return TaskHandle(self, response.json()["task_id"])

    def submit_batch(self, tasks: Iterable[dict[str, Any]]) -> list[TaskHandle]:
        """Queue many tasks in one transaction. Each item is a POST /process body, e.g.
        {"operation": "compute", "data": {"n": 3}, "priority": 1}. A batch takes no
        Idempotency-Key, so it is retried only when it cannot have been stored."""
        response = self._request("POST", "/process/batch", json={"tasks": list(tasks)})
        return [TaskHandle(self, item["task_id"]) for item in response.json()["tasks"]]

    def _request(self, method: str, path: str, *, idempotent: bool = False, **kwargs: Any) -> requests.Response:
        """One API call with the client's retries; raises the API's error as its typed exception.

        GETs, and POSTs the caller marks idempotent, are retried on any
        transient failure. Other POSTs are retried only when they cannot have
        been stored: the connection was never made, or the answer was a 429.
        """
        safe = idempotent or method == "GET"
        kwargs.setdefault("timeout", self.timeout)
        delay = self.backoff
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self.session.request(method, self.base_url + path, **kwargs)
            except (requests.ConnectionError, requests.Timeout) as exc:
                if last or not (safe or _never_sent(exc)):
                    raise
                time.sleep(delay)
                delay *= 2
                continue
            if response.ok:
                return response
            error = _api_error(response)
            if last or response.status_code not in _RETRYABLE_STATUSES or not (safe or response.status_code == 429):
                raise error
            time.sleep(delay if error.retry_after is None else error.retry_after)
            delay *= 2
        raise AssertionError("unreachable")


def _never_sent(exc: requests.RequestException) -> bool:
    """True when no connection was made, so the request cannot have reached the API."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = exc.args[0] if exc.args else None
    return isinstance(getattr(reason, "reason", reason), NewConnectionError)


def _task_body(
    operation: str,
    data: dict[str, Any],
    priority: int | None,
    run_at: datetime | str | None,
    delay_seconds: float | None,
    max_attempts: int | None,
    callback_url: str | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"operation": operation, "data": data}
    if isinstance(run_at, datetime):
        run_at = run_at.isoformat()
    options = {
        "priority": priority,
        "run_at": run_at,
        "delay_seconds": delay_seconds,
        "max_attempts": max_attempts,
        "callback_url": callback_url,
    }
    body.update({name: value for name, value in options.items() if value is not None})
    return body
