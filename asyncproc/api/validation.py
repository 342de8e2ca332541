"""Turning a request into a NewTask, or into a 4xx that says what is wrong."""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from jsonschema import Draft202012Validator

from asyncproc import contract
from asyncproc.errors import BatchTooLarge, InvalidRequest, MalformedBody, TaskNotFound
from asyncproc.ledger import NewTask
from asyncproc.operations import InvalidInput, registry
from asyncproc.webhooks import AllowList, CallbackRefused, check_url

OPERATION_PATTERN = re.compile(contract.OPERATION_PATTERN)
HEADER_VALUE = re.compile(r"^[\x21-\x7e]{1,255}$")
TOP_LEVEL_FIELDS = frozenset(contract.PROCESS_FIELDS)
# Each field's own schema decides whether its value is valid, so that the API
# takes what /openapi.json says it takes (3.0 is an integer there, true is not).
FIELD_VALIDATORS = {name: Draft202012Validator(schema) for name, schema in contract.PROCESS_FIELDS.items()}
MAX_DEPTH = 32
MAX_WAIT_SECONDS = 60
UTF8_BOM = b"\xef\xbb\xbf"
# A 422 names this many unknown fields at most, and counts the rest.
MAX_NAMED_FIELDS = 20


def parse_json_body(raw: bytes) -> Any:
    if not raw.strip():
        raise MalformedBody("The request body is empty; send a JSON object")
    if raw.startswith(UTF8_BOM):
        raise MalformedBody("The body starts with a byte order mark; send UTF-8 without one")
    try:
        # Decoded here, strictly: json.loads would also take UTF-16 and UTF-32 bytes.
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedBody(f"The request body is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise MalformedBody("The JSON body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedBody(f"The request body is not valid JSON: {exc}") from None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in JSON")


def check_storable(value: Any, path: str, depth: int = 0) -> None:
    """Reject what PostgreSQL's jsonb cannot store exactly as sent."""
    if depth > MAX_DEPTH:
        raise InvalidRequest(f"{path} is nested deeper than {MAX_DEPTH} levels", [{"field": path}])
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidRequest(f"{path} contains a NUL character", [{"field": path}])
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest(f"{path} contains an unpaired surrogate", [{"field": path}]) from None
    elif isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequest(f"{path} is not a finite number", [{"field": path}])
    elif isinstance(value, dict):
        for key, item in value.items():
            check_storable(key, f"{path} key", depth + 1)
            check_storable(item, f"{path}.{key}", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_storable(item, f"{path}[{index}]", depth + 1)


def _field(body: dict[str, Any], name: str) -> Any:
    """The field's value, or its default; InvalidRequest, worded from its schema, when its schema refuses it."""
    schema = contract.PROCESS_FIELDS[name]
    value = body.get(name, schema.get("default"))
    if not FIELD_VALIDATORS[name].is_valid(value):
        raise InvalidRequest(f"{name} must be {contract.value_rule(schema)}", [{"field": name}])
    return value


def _timeout(body: dict[str, Any]) -> float | None:
    value = _field(body, "timeout_seconds")
    return None if value is None else float(value)


def _run_at(body: dict[str, Any], now: datetime) -> datetime | None:
    if "run_at" in body and "delay_seconds" in body:
        raise InvalidRequest("Send run_at or delay_seconds, not both", [{"field": "run_at"}])
    if "delay_seconds" in body:
        return now + timedelta(seconds=_field(body, "delay_seconds"))
    if "run_at" in body:
        value = body["run_at"]
        try:
            if not isinstance(value, str):
                raise ValueError
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidRequest(
                "run_at must be an ISO 8601 timestamp, for example 2030-01-01T12:00:00Z",
                [{"field": "run_at"}],
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        if not datetime(1970, 1, 1, tzinfo=timezone.utc) <= moment <= now + timedelta(seconds=contract.MAX_DELAY_SECONDS):
            raise InvalidRequest("run_at is out of range", [{"field": "run_at"}])
        return moment
    return None


def _operation(body: dict[str, Any], data: dict[str, Any]) -> str:
    inner = data.get("operation")
    outer = body.get("operation")
    if inner is not None and outer is not None and inner != outer:
        raise InvalidRequest(
            "operation is given twice with different values", [{"field": "operation"}]
        )
    operation = inner if inner is not None else outer if outer is not None else contract.DEFAULT_OPERATION
    if not isinstance(operation, str) or not OPERATION_PATTERN.match(operation):
        raise InvalidRequest(
            "operation must be 1-100 characters of letters, digits, '_', '.', ':' or '-'",
            [{"field": "operation"}],
        )
    return operation


def _callback_url(body: dict[str, Any], allow: AllowList, can_sign: bool) -> str | None:
    url = body.get("callback_url")
    if url is None:
        return None
    if not isinstance(url, str):
        raise InvalidRequest("callback_url must be a string", [{"field": "callback_url"}])
    if not can_sign:
        raise InvalidRequest(
            "callback_url needs an API key (ASYNCPROC_AUTH=required) or ASYNCPROC_CALLBACK_SECRET to sign the calls",
            [{"field": "callback_url"}],
        )
    try:
        check_url(url, allow)
    except CallbackRefused as exc:
        raise InvalidRequest(str(exc), [{"field": "callback_url"}]) from None
    return url


def new_task(
    body: Any,
    *,
    idempotency_key: str | None,
    request_id: str | None,
    owner: int | None = None,
    callback_allow: AllowList = AllowList(),
    can_sign: bool = False,
) -> NewTask:
    if not isinstance(body, dict):
        raise InvalidRequest("The JSON body must be an object")
    unknown = sorted(set(body) - TOP_LEVEL_FIELDS)
    if unknown:
        named = [name[:100] for name in unknown[:MAX_NAMED_FIELDS]]
        more = len(unknown) - len(named)
        raise InvalidRequest(
            "Unknown fields: " + ", ".join(named) + (f" and {more} more" if more else ""),
            [{"field": name, "problem": "unknown field"} for name in named]
            + ([{"problem": f"{more} more unknown fields"}] if more else []),
        )
    # Every field, not only data: PostgreSQL stores no NUL, and a NUL in run_at is no timestamp.
    for name in TOP_LEVEL_FIELDS - {"data"}:
        if name in body:
            check_storable(body[name], name)
    data = body.get("data", {})
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidRequest("data must be a JSON object", [{"field": "data"}])
    check_storable(data, "data")
    operation = _operation(body, data)
    payload = {key: value for key, value in data.items() if key != "operation"}
    try:
        registry.check(operation, payload)
    except InvalidInput as exc:
        raise InvalidRequest(str(exc), exc.details) from None
    # int(): JSON Schema counts 3.0 as the integer 3, and the columns are integers.
    max_attempts = int(_field(body, "max_attempts"))
    priority = int(_field(body, "priority"))
    run_at = _run_at(body, datetime.now(timezone.utc))
    fingerprint = None
    if idempotency_key is not None:
        # The whole request, schedule included, with the defaults filled in.
        fingerprint = request_fingerprint(
            {
                **{name: value for name, value in body.items() if name not in ("data", "run_at")},
                "operation": operation,
                "payload": payload,
                "max_attempts": max_attempts,
                "priority": priority,
                "run_at": None if "run_at" not in body else run_at.isoformat(),
            }
        )
    return NewTask(
        operation=operation,
        payload=payload,
        max_attempts=max_attempts,
        priority=priority,
        run_at=run_at,
        timeout_seconds=_timeout(body),
        idempotency_key=idempotency_key,
        request_id=request_id,
        owner=owner,
        idempotency_fingerprint=fingerprint,
        callback_url=_callback_url(body, callback_allow, can_sign),
    )


def request_fingerprint(request: dict[str, Any]) -> str:
    """sha256 of the request by value: keys in order, and numbers as JSON
    numbers (1e23, 100000000000000000000000 and 1e23 as a float are one value)."""
    return hashlib.sha256(json.dumps(_canonical(request), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _canonical(value: Any) -> Any:
    """Strings and numbers tagged so that no string can pass for a number."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        return "s" + value
    if isinstance(value, (int, float)):
        # repr() of a float is its shortest JSON form; Decimal compares it by value.
        number = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
        return "n" + str(number.normalize())
    if isinstance(value, dict):
        return {key: _canonical(item) for key, item in value.items()}
    return [_canonical(item) for item in value]


def new_tasks(
    body: Any,
    *,
    request_id: str | None,
    owner: int | None = None,
    callback_allow: AllowList = AllowList(),
    can_sign: bool = False,
) -> list[NewTask]:
    """A batch `{"tasks": [...]}`: each item as for POST /process; errors name the item."""
    if not isinstance(body, dict) or set(body) != {"tasks"} or not isinstance(body["tasks"], list):
        raise InvalidRequest('The JSON body must be {"tasks": [ ... ]}', [{"field": "tasks"}])
    items = body["tasks"]
    if not items:
        raise InvalidRequest(f"tasks is empty; send 1 to {contract.MAX_BATCH_TASKS} tasks", [{"field": "tasks"}])
    if len(items) > contract.MAX_BATCH_TASKS:
        raise BatchTooLarge(
            f"A batch holds at most {contract.MAX_BATCH_TASKS} tasks, not {len(items)}",
            {"max_tasks": contract.MAX_BATCH_TASKS, "tasks": len(items)},
        )
    batch = []
    for index, item in enumerate(items):
        try:
            batch.append(
                new_task(
                    item,
                    idempotency_key=None,
                    request_id=request_id,
                    owner=owner,
                    callback_allow=callback_allow,
                    can_sign=can_sign,
                )
            )
        except InvalidRequest as exc:
            raise InvalidRequest(
                f"tasks[{index}]: {exc.message}", {"index": index, "problems": exc.details}
            ) from None
    return batch


def header_token(value: str | None, name: str) -> str | None:
    """A header such as Idempotency-Key: printable ASCII, at most 255 characters."""
    if value is None:
        return None
    if not HEADER_VALUE.match(value):
        raise InvalidRequest(
            f"{name} must be 1-255 printable ASCII characters without spaces", [{"field": name}]
        )
    return value


def wait_seconds(value: str | None) -> float:
    """The ?wait=N of a long poll: 0 (no wait) to MAX_WAIT_SECONDS."""
    if value is None:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds <= MAX_WAIT_SECONDS:
        raise InvalidRequest(f"wait must be a number of seconds from 0 to {MAX_WAIT_SECONDS}", [{"field": "wait"}])
    return seconds


def task_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise TaskNotFound(f"No task with id {value[:100]!r}") from None
