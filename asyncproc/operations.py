"""The operation registry and the built-in operations, shared by the API and the worker.

A handler is a plain function `handler(payload: dict, ctx: TaskContext)` that
returns something JSON can encode. It may also be an `async def`. Register it
under a stable name: queued tasks refer to that name, so renaming a handler
would orphan them. Its `input_schema`, a small subset of JSON Schema, is checked
by the API (a 422 before anything is stored) and again by the worker, because
a psql INSERT never passes through the API. The API also publishes it in
/openapi.json.

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
(see docs/handlers.md).
"""

from __future__ import annotations

import importlib
import inspect
import os
import random
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable
from uuid import UUID

from asyncproc.config import SecondsRange
from asyncproc.errors import ConfigError

Handler = Callable[[dict[str, Any], "TaskContext"], Any]

# The JSON Schema keywords an input_schema may use; anything else is refused
# at registration rather than silently ignored.
SCHEMA_KEYWORDS = frozenset(
    {"type", "properties", "required", "additionalProperties", "minimum", "maximum",
     "minLength", "maxLength", "items", "enum", "default", "description"}
)
ANY_OBJECT: dict[str, Any] = {"type": "object"}
# "process": a child process of the worker (the default for sync handlers);
# "thread": a thread of the worker. Async handlers run on the worker's loop.
ISOLATIONS = ("process", "thread")
# The longest time limit a task or an operation may set: a week.
MAX_TIMEOUT_SECONDS = 7 * 86400


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

    def register(
        self,
        name: str,
        input_schema: dict[str, Any] | None = None,
        *,
        isolation: str | None = None,
        timeout_seconds: float | None = None,
        memory_mb: int | None = None,
    ) -> Callable[[Handler], Handler]:
        schema = ANY_OBJECT if input_schema is None else input_schema
        _check_schema(schema, name)
        if schema.get("type") != "object":
            raise ValueError(f"operation {name!r}: input_schema must have type object")
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

    def check(self, name: str, payload: dict[str, Any]) -> Handler:
        """The handler for `name`, once `payload` passes its input_schema; else InvalidInput."""
        known = self._operations.get(name)
        if known is None:
            raise InvalidInput(
                f"unknown operation {name!r}; known: {', '.join(self.names())}",
                [{"field": "operation", "problem": "unknown operation"}],
            )
        problems = schema_problems(known.input_schema, payload, "data")
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


def _check_schema(schema: dict[str, Any], where: str) -> None:
    unknown = set(schema) - SCHEMA_KEYWORDS
    if unknown:
        raise ValueError(f"operation {where!r}: unsupported input_schema keywords {sorted(unknown)}")
    for name, sub in schema.get("properties", {}).items():
        _check_schema(sub, f"{where}.{name}")
    if "items" in schema:
        _check_schema(schema["items"], f"{where}[]")


_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "null": lambda v: v is None,
}


def schema_problems(schema: dict[str, Any], value: Any, path: str) -> list[dict[str, str]]:
    """What is wrong with `value` under the JSON Schema subset of SCHEMA_KEYWORDS."""
    expected = schema.get("type")
    if expected is not None:
        types = [expected] if isinstance(expected, str) else expected
        if not any(_TYPES[t](value) for t in types):
            return [{"field": path, "problem": f"must be of type {' or '.join(types)}"}]
    if "enum" in schema and value not in schema["enum"]:
        return [{"field": path, "problem": "must be one of " + ", ".join(map(repr, schema["enum"]))}]
    problems: list[dict[str, str]] = []
    if _TYPES["number"](value):
        if "minimum" in schema and value < schema["minimum"]:
            problems.append({"field": path, "problem": f"must be at least {schema['minimum']}"})
        if "maximum" in schema and value > schema["maximum"]:
            problems.append({"field": path, "problem": f"must be at most {schema['maximum']}"})
    elif isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            problems.append({"field": path, "problem": f"must be at least {schema['minLength']} characters"})
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            problems.append({"field": path, "problem": f"must be at most {schema['maxLength']} characters"})
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            problems += schema_problems(schema["items"], item, f"{path}[{index}]")
    elif isinstance(value, dict):
        properties = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                problems.append({"field": f"{path}.{name}", "problem": "is required"})
        for name, item in value.items():
            if name in properties:
                problems += schema_problems(properties[name], item, f"{path}.{name}")
            elif schema.get("additionalProperties", True) is False:
                problems.append({"field": f"{path}.{name}", "problem": "is not an accepted field"})
    return problems


@operation(
    "compute",
    input_schema={
        "type": "object",
        "description": "The seed's demo: the sum of the integers below n, after simulated heavy work.",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 10**12, "default": 1_000_000}},
    },
)
def compute(payload: dict[str, Any], ctx: TaskContext) -> int:
    n = payload.get("n", 1_000_000)
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
)
def fail(payload: dict[str, Any], ctx: TaskContext) -> dict[str, int]:
    message = payload.get("message", "requested failure")
    times = payload.get("times")
    if times is None or ctx.attempt <= times:
        raise RuntimeError(message)
    return {"succeeded_on_attempt": ctx.attempt}
