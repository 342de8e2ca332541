"""The one place where asyncproc relies on a private name of gunicorn.

gunicorn answers some requests itself, before any application sees them: a
malformed request line (400), a request line or a header over its limits (414,
431), an unsupported transfer coding (501). It writes those answers in
text/plain, and offers no setting, hook or public method to write them in
another shape; the rest of our API answers every error in JSON
(asyncproc.errors.error_body). So this module overrides the one private method
through which gunicorn's HTTP/1 protocol writes them:

- ``gunicorn.asgi.protocol.ASGIProtocol._send_error_response(self, status,
  message, extra_headers=())``: gunicorn calls it with the status, a message
  and extra header lines, and closes the connection itself afterwards.

Nothing else private is used, here or elsewhere in asyncproc: the worker
builds its connections with ASGIProtocol's public constructor and drives them
through the public asyncio.Protocol interface (asyncproc.api.asgi).
tests/unit/test_gunicorn_contract.py checks every entry of PRIVATE_NAMES
against the installed gunicorn, and setup.cfg admits only the gunicorn
versions it passed on.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Iterable

from gunicorn.asgi.protocol import ASGIProtocol

# The whole HTTP/1.1 answer to an error gunicorn raised: status, message, extra headers.
RenderError = Callable[[int, str, Iterable[tuple[str, str]]], bytes]

# Each private name this module relies on, with the signature it expects.
PRIVATE_NAMES = {
    "gunicorn.asgi.protocol.ASGIProtocol._send_error_response": "(self, status, message, extra_headers=())",
}


def http1_protocol(worker, render_error: RenderError) -> asyncio.Protocol:
    """gunicorn's protocol for one connection of `worker`, its own error answers written by `render_error`."""
    return _JsonErrors(worker, render_error)


class _JsonErrors(ASGIProtocol):
    # Double underscores: gunicorn's own attributes, present or future, cannot clash with ours.
    def __init__(self, worker, render_error: RenderError):
        super().__init__(worker)
        self.__render_error = render_error
        self.__transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.__transport = transport
        super().connection_made(transport)

    def _send_error_response(self, status, message, extra_headers=()):
        transport = self.__transport
        # Already closing: the client left, or our header timeout has answered it.
        if transport is not None and not transport.is_closing():
            transport.write(self.__render_error(status, message, extra_headers))
