"""The handler module of a worker deployed after the API learned `late_op` (a rolling deploy)."""

import tests.e2e.custom_operations  # noqa: F401 - the older worker's operations too
from asyncproc.operations import operation


@operation("late_op")
def late_op(payload, ctx):
    return {"ran_on_attempt": ctx.attempt}
