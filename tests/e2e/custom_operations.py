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
