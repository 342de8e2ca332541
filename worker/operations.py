"""The handler registry and the built-in operations.

A handler is a plain function `handler(payload: dict, ctx: TaskContext)` that
returns something JSON can encode. It may also be an `async def`. Register it
under a stable name: queued tasks refer to that name, so renaming a handler
would orphan them.

    from worker.operations import PermanentError, operation

    @operation("resize")
    def resize(payload, ctx):
        ...

Users put their handlers in their own module and name it in
ASYNCPROC_OPERATIONS_MODULE; the worker imports it at start-up.
"""

from __future__ import annotations

import importlib
import random
import threading
from dataclasses import dataclass, field
from typing import Any, Callable
from uuid import UUID

from asyncproc.config import SecondsRange

Handler = Callable[[dict[str, Any], "TaskContext"], Any]


class PermanentError(Exception):
    """Raised by a handler when retrying cannot help, such as for invalid input."""


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


class Registry:
    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def register(self, name: str) -> Callable[[Handler], Handler]:
        def decorator(handler: Handler) -> Handler:
            if name in self._handlers and self._handlers[name] is not handler:
                raise ValueError(f"operation {name!r} is already registered")
            self._handlers[name] = handler
            return handler

        return decorator

    def get(self, name: str) -> Handler | None:
        return self._handlers.get(name)

    def names(self) -> list[str]:
        return sorted(self._handlers)


registry = Registry()
operation = registry.register


def load_user_module(module_name: str | None) -> None:
    """Import the user's handler module, whose decorators register into `registry`."""
    if module_name:
        importlib.import_module(module_name)


def _integer_input(payload: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = payload.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise PermanentError(f"{name} must be an integer from {low} to {high}")
    return value


def _seconds_input(payload: dict[str, Any], name: str, default: float) -> float:
    value = payload.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 86400:
        raise PermanentError(f"{name} must be a number of seconds from 0 to 86400")
    return float(value)


@operation("compute")
def compute(payload: dict[str, Any], ctx: TaskContext) -> int:
    """The seed's demo: the sum of the integers below n, after simulated heavy work."""
    n = _integer_input(payload, "n", 1_000_000, 0, 10**12)
    seconds = random.uniform(ctx.compute_seconds.low, ctx.compute_seconds.high)
    if seconds > 0:
        steps = 10
        for step in range(steps):
            if ctx.stop_event.wait(seconds / steps):
                raise Stopped("compute stopped on request")
            ctx.report_progress((step + 1) * 100 // steps - 1, f"step {step + 1} of {steps}")
    return n * (n - 1) // 2


@operation("sleep")
def sleep(payload: dict[str, Any], ctx: TaskContext) -> dict[str, float]:
    seconds = _seconds_input(payload, "seconds", 1.0)
    if ctx.stop_event.wait(seconds):
        raise Stopped("sleep stopped on request")
    return {"slept": seconds}


@operation("fail")
def fail(payload: dict[str, Any], ctx: TaskContext) -> dict[str, int]:
    """Fails its first `times` attempts with `message`; without `times`, always."""
    message = payload.get("message", "requested failure")
    if not isinstance(message, str):
        raise PermanentError("message must be a string")
    times = payload.get("times")
    if times is not None:
        times = _integer_input(payload, "times", 0, 0, 100)
    if times is None or ctx.attempt <= times:
        raise RuntimeError(message)
    return {"succeeded_on_attempt": ctx.attempt}
