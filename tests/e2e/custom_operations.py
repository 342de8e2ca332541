"""A user's handler module, loaded by the e2e worker via ASYNCPROC_OPERATIONS_MODULE."""

import asyncio

from asyncproc.operations import operation


@operation("shout")
def shout(payload, ctx):
    return {"text": str(payload.get("text", "")).upper(), "attempt": ctx.attempt}


@operation("async_echo")
async def async_echo(payload, ctx):
    await asyncio.sleep(0)
    return payload


@operation("steps")
def steps(payload, ctx):
    """Reports progress through `count` steps of `seconds` each; honours cancellation."""
    count = int(payload.get("count", 3))
    for step in range(1, count + 1):
        if ctx.stop_event.wait(float(payload.get("seconds", 0.3))):
            return {"stopped_at": step}
        ctx.report_progress(step * 100 // (count + 1), f"step {step}")
    return {"steps": count}
