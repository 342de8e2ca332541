"""The operation registry and the built-in operations, shared by the API and the worker.

A handler is a plain function `handler(payload: dict, ctx: TaskContext)` that
returns something JSON can encode. It may also be an `async def`. Register it
under a stable name: queued tasks refer to that name, so renaming a handler
would orphan them. Its `input_schema` is JSON Schema Draft 2020-12, the dialect
of OpenAPI 3.1, checked by the jsonschema library: by the API (a 422 before
anything is stored) and again by the worker, because a psql INSERT never passes
through the API. The API publishes it in /openapi.json, where it means what the
checks do.

    from asyncproc.operations import PermanentError, operation

    @operation("resize", input_schema={
        "type": "object",
        "required": ["url"],
        "properties": {"url": {"type": "string", "maxLength": 2000}},
    })
    def resize(payload, ctx):
        ...

Users put their handlers in their own module and name it in
ASYNCPROC_OPERATIONS_MODULE; the API and the worker import it at start-up.

A sync handler runs in a child process of the worker, so that a crash, a hang
or a leak costs only its own attempt; `isolation="thread"` runs it in a thread
of the worker instead, and `timeout_seconds` and `memory_mb` bound each run
(see docs/handlers.md). `strict=True` refuses input fields the schema does
not declare, as the built-in operations do; without it they are accepted.
"""

from __future__ import annotations

import importlib
import inspect
import os
import random
import re
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable
from uuid import UUID

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError

from asyncproc.config import SecondsRange
from asyncproc.contract import MAX_TIMEOUT_SECONDS
from asyncproc.errors import ConfigError

Handler = Callable[[dict[str, Any], "TaskContext"], Any]

ANY_OBJECT: dict[str, Any] = {"type": "object"}
DIALECT = Draft202012Validator.META_SCHEMA["$id"]
# "process": a child process of the worker (the default for sync handlers);
# "thread": a thread of the worker. Async handlers run on the worker's loop.
ISOLATIONS = ("process", "thread")
# A problem that quotes a huge value would make a huge 422 and log line.
MAX_PROBLEM_LENGTH = 200


class PermanentError(Exception):
    """Raised by a handler when retrying cannot help, such as for invalid input."""


class InvalidInput(PermanentError):
    """An unknown operation, or input that fails the operation's input_schema."""

    def __init__(self, message: str, details: list[dict[str, str]]):
        super().__init__(message)
        self.details = details


class Stopped(Exception):
    """Raised by a handler that honoured should_stop(); its task was already re-queued or cancelled."""


def _no_progress(percent: int, message: str | None) -> None:
    """The progress sink of a context that reports nowhere, as in unit tests."""


@dataclass(frozen=True)
class TaskContext:
    """What a handler knows of its run, and how it talks back.

    `report_progress(percent, message)` may be called as often as you like: the
    worker writes at most one update per ASYNCPROC_PROGRESS_INTERVAL_SECONDS.
    `should_stop()` turns true when the task is cancelled or the worker shuts
    down; a long handler that checks it stops early instead of running on.
    """

    task_id: UUID
    attempt: int
    max_attempts: int
    request_id: str | None
    compute_seconds: SecondsRange
    progress_sink: Callable[[int, str | None], None] = _no_progress
    stop_event: threading.Event = field(default_factory=threading.Event)

    def report_progress(self, percent: int, message: str | None = None) -> None:
        self.progress_sink(max(0, min(100, int(percent))), message)

    def should_stop(self) -> bool:
        return self.stop_event.is_set()


@dataclass(frozen=True)
class Operation:
    name: str
    handler: Handler
    input_schema: dict[str, Any] = field(default_factory=lambda: ANY_OBJECT)
    # None for an async handler, which runs on the worker's event loop.
    isolation: str | None = "process"
    # None: the task's own limit, else ASYNCPROC_HANDLER_TIMEOUT_SECONDS.
    timeout_seconds: float | None = None
    # None: ASYNCPROC_HANDLER_MEMORY_MB.
    memory_mb: int | None = None


class Registry:
    def __init__(self) -> None:
        self._operations: dict[str, Operation] = {}
        self._validators: dict[str, Draft202012Validator] = {}

    def register(
        self,
        name: str,
        input_schema: dict[str, Any] | None = None,
        *,
        isolation: str | None = None,
        timeout_seconds: float | None = None,
        memory_mb: int | None = None,
        strict: bool = False,
    ) -> Callable[[Handler], Handler]:
        schema = ANY_OBJECT if input_schema is None else input_schema
        validator = compile_schema(schema, name)
        if strict:
            if schema.get("additionalProperties", False) is not False:
                raise ValueError(f"operation {name!r}: strict=True and input_schema's additionalProperties disagree")
            schema = {**schema, "additionalProperties": False}
            validator = Draft202012Validator(schema)
        if isolation is not None and isolation not in ISOLATIONS:
            raise ValueError(f"operation {name!r}: isolation must be one of {', '.join(ISOLATIONS)}")
        if timeout_seconds is not None and not 0 < timeout_seconds <= MAX_TIMEOUT_SECONDS:
            raise ValueError(f"operation {name!r}: timeout_seconds must be from 0 to {MAX_TIMEOUT_SECONDS}")
        if memory_mb is not None and not (isinstance(memory_mb, int) and memory_mb >= 16):
            raise ValueError(f"operation {name!r}: memory_mb must be an integer of at least 16")

        def decorator(handler: Handler) -> Handler:
            known = self._operations.get(name)
            if known is not None and known.handler is not handler:
                raise ValueError(f"operation {name!r} is already registered")
            is_async = inspect.iscoroutinefunction(handler)
            if is_async and isolation == "thread":
                raise ValueError(f"operation {name!r}: an async handler runs on the event loop, not in a thread")
            where = isolation or (None if is_async else "process")
            if memory_mb is not None and where != "process":
                # Only a process of its own can be limited and killed alone.
                raise ValueError(f"operation {name!r}: memory_mb needs isolation='process'")
            self._operations[name] = Operation(name, handler, schema, where, timeout_seconds, memory_mb)
            self._validators[name] = validator
            return handler

        return decorator

    def get(self, name: str) -> Handler | None:
        known = self._operations.get(name)
        return None if known is None else known.handler

    def find(self, name: str) -> Operation | None:
        return self._operations.get(name)

    def names(self) -> list[str]:
        return sorted(self._operations)

    def input_schemas(self) -> dict[str, dict[str, Any]]:
        return {name: self._operations[name].input_schema for name in self.names()}

    def require(self, name: str) -> Operation:
        """The operation registered as `name`; else InvalidInput naming those that are."""
        known = self._operations.get(name)
        if known is None:
            raise InvalidInput(
                f"unknown operation {name!r}; known: {', '.join(self.names())}",
                [{"field": "operation", "problem": "unknown operation"}],
            )
        return known

    def check(self, name: str, payload: dict[str, Any]) -> Handler:
        """The handler for `name`, once `payload` passes its input_schema; else InvalidInput."""
        known = self.require(name)
        problems = schema_problems(self._validators[name], payload, "data")
        if problems:
            summary = "; ".join(f"{p['field']} {p['problem']}" for p in problems)
            raise InvalidInput(f"invalid input for {name}: {summary}", problems)
        return known.handler


registry = Registry()
operation = registry.register


def load_user_module(module_name: str | None) -> None:
    """Import the user's handler module, whose decorators register into `registry`."""
    if not module_name:
        return
    # The directory a command runs in is importable, as for `python -m`, so
    # that `ASYNCPROC_OPERATIONS_MODULE=myops` finds ./myops.py; the
    # `asyncproc` script alone would not put it on the path.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        importlib.import_module(module_name)
    except Exception as exc:
        # Any error in the user's module, a SyntaxError or one its own imports
        # raise, is one line naming the variable.
        raise ConfigError(
            f"ASYNCPROC_OPERATIONS_MODULE={module_name!r} cannot be imported: {type(exc).__name__}: {exc}"
        ) from None


def compile_schema(schema: Any, name: str) -> Draft202012Validator:
    """The validator of an input_schema; ValueError, one line naming the operation, if it is no valid schema."""
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise ValueError(f"operation {name!r}: input_schema must be a JSON Schema object with type object")
    if schema.get("$schema", DIALECT).rstrip("#") != DIALECT:
        raise ValueError(
            f"operation {name!r}: input_schema is checked as JSON Schema {DIALECT}, the dialect of OpenAPI 3.1, "
            f"not as {schema['$schema']!r}"
        )
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(map(str, exc.absolute_path)) or "its top level"
        raise ValueError(
            f"operation {name!r}: input_schema is not valid JSON Schema: {_one_line(exc.message)} (at {where})"
        ) from None
    return Draft202012Validator(schema)


def schema_problems(validator: Draft202012Validator, value: Any, path: str) -> list[dict[str, str]]:
    """What is wrong with `value` under the validator's schema: each field and its problem.

    A value of the wrong type gets that one problem, not also each rule that type cannot meet.
    """
    errors = list(validator.iter_errors(value))
    mistyped = {tuple(error.absolute_path) for error in errors if error.validator == "type"}
    problems: list[dict[str, str]] = []
    for error in errors:
        if error.validator != "type" and tuple(error.absolute_path) in mistyped:
            continue
        field = path + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error.absolute_path)
        for problem in _problems(error, field):
            if problem not in problems:
                problems.append(problem)
    return problems


def _problems(error: ValidationError, field: str) -> list[dict[str, str]]:
    rule = error.validator_value
    if error.validator == "required":
        return [{"field": f"{field}.{name}", "problem": "is required"} for name in rule if name not in error.instance]
    if error.validator == "additionalProperties" and rule is False:
        declared = error.schema.get("properties", {})
        patterns = error.schema.get("patternProperties", {})
        return [
            {"field": f"{field}.{name}", "problem": "is not an accepted field"}
            for name in error.instance
            if name not in declared and not any(re.search(pattern, name) for pattern in patterns)
        ]
    if error.validator == "type":
        problem = "must be of type " + " or ".join([rule] if isinstance(rule, str) else rule)
    elif error.validator == "enum":
        problem = "must be one of " + ", ".join(map(repr, rule))
    else:
        problem = {
            "minimum": f"must be at least {rule}",
            "maximum": f"must be at most {rule}",
            "exclusiveMinimum": f"must be above {rule}",
            "exclusiveMaximum": f"must be below {rule}",
            "minLength": f"must be at least {rule} characters",
            "maxLength": f"must be at most {rule} characters",
            "multipleOf": f"must be a multiple of {rule}",
            "pattern": f"must match the pattern {rule!r}",
            "const": f"must be {rule!r}",
            "minItems": f"must have at least {rule} items",
            "maxItems": f"must have at most {rule} items",
            "uniqueItems": "must not repeat an item",
            "anyOf": "must match at least one of its schemas",
            "oneOf": "must match exactly one of its schemas",
            "not": "must not match the schema under `not`",
        }.get(error.validator, error.message)
    return [{"field": field, "problem": _one_line(problem)}]


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_PROBLEM_LENGTH else text[: MAX_PROBLEM_LENGTH - 3] + "..."


@operation(
    "compute",
    input_schema={
        "type": "object",
        "description": "The seed's demo: the sum of the integers below n, after simulated heavy work.",
        "properties": {
            "n": {"type": "integer", "minimum": 0, "maximum": 10**12, "default": 1_000_000},
            "input": {"description": "Accepted and ignored, as by the seed: its example body sends it."},
        },
    },
    strict=True,
)
def compute(payload: dict[str, Any], ctx: TaskContext) -> int:
    # JSON Schema counts 10.0 as an integer; the sum below it is exact only in int arithmetic.
    n = int(payload.get("n", 1_000_000))
    seconds = random.uniform(ctx.compute_seconds.low, ctx.compute_seconds.high)
    if seconds > 0:
        steps = 10
        for step in range(steps):
            if ctx.stop_event.wait(seconds / steps):
                raise Stopped("compute stopped on request")
            ctx.report_progress((step + 1) * 100 // steps - 1, f"step {step + 1} of {steps}")
    return n * (n - 1) // 2


@operation(
    "sleep",
    input_schema={
        "type": "object",
        "description": "Waits `seconds`.",
        "properties": {"seconds": {"type": "number", "minimum": 0, "maximum": 86400, "default": 1}},
    },
    strict=True,
)
def sleep(payload: dict[str, Any], ctx: TaskContext) -> dict[str, float]:
    seconds = float(payload.get("seconds", 1.0))
    if ctx.stop_event.wait(seconds):
        raise Stopped("sleep stopped on request")
    return {"slept": seconds}


@operation(
    "fail",
    input_schema={
        "type": "object",
        "description": "Fails its first `times` attempts with `message`, then succeeds; without `times`, always.",
        "properties": {
            "times": {"type": "integer", "minimum": 0, "maximum": 100},
            "message": {"type": "string", "maxLength": 1000},
        },
    },
    strict=True,
)
def fail(payload: dict[str, Any], ctx: TaskContext) -> dict[str, int]:
    message = payload.get("message", "requested failure")
    times = payload.get("times")
    if times is None or ctx.attempt <= times:
        raise RuntimeError(message)
    return {"succeeded_on_attempt": ctx.attempt}
