"""The API's HTTP front: gunicorn's asyncio worker, with Flask on a few threads.

Every connection of a process lives on one event loop: headers and bodies are
read there, however slowly they come, and long polls and event streams wait
there (asyncproc.waiting). Only a request that has fully arrived takes one of
ASYNCPROC_API_THREADS threads, for the time Flask needs to answer it. So
thousands of waiting or slow clients leave the other requests' latency alone.

On top of gunicorn's worker: header and body read timeouts, a cap on
connections per client address, and errors in our JSON shape even when they
are raised before the request reaches Flask (400, 414, 431 from the parser).
"""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Any

from flask import Flask
from gunicorn.asgi import protocol as gunicorn_protocol
from gunicorn.workers import gasgi

from asyncproc.api.clients import is_trusted_proxy
from asyncproc.config import Settings
from asyncproc.errors import HTTP_CODES, AsyncprocError, BodyTooLarge, RequestTimeout, error_body
from asyncproc.waiting import Parked

log = logging.getLogger(__name__)

# Set in the WSGI environ: the loop a route may park its response on, and where it puts it.
LOOP_KEY = "asyncproc.loop"
PARKED_KEY = "asyncproc.parked"


class WsgiBridge:
    """An ASGI application running a WSGI one on a thread pool, with parked responses."""

    def __init__(self, app: Flask, settings: Settings):
        self.app = app
        self._max_body = settings.max_body_bytes
        self._body_timeout = settings.body_timeout_seconds
        self._threads = ThreadPoolExecutor(settings.api_threads, thread_name_prefix="api")

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] != "http":
            return
        try:
            async with asyncio.timeout(self._body_timeout):
                body = await self._read_body(receive, scope["headers"])
        except TimeoutError:
            await _send_error(send, RequestTimeout(f"The body did not arrive within {self._body_timeout:g}s"))
            return
        except BodyTooLarge as exc:
            await _send_error(send, exc)
            return
        environ = _environ(scope, body)
        environ[LOOP_KEY] = asyncio.get_running_loop()
        # A fresh context per request: nothing one request sets (its id) is seen by the next.
        status, headers, content = await asyncio.get_running_loop().run_in_executor(
            self._threads, contextvars.Context().run, self._call, environ
        )
        parked: Parked | None = environ.get(PARKED_KEY)
        if parked is None:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": content})
            return
        headers = [(name, value) for name, value in headers if name != b"content-length"]
        await _send_parked(receive, send, status, headers, parked)

    async def _read_body(self, receive, headers: list[tuple[bytes, bytes]]) -> bytes:
        declared = dict(headers).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self._max_body:
            raise BodyTooLarge(f"The body is larger than {self._max_body} bytes")
        # However the body is framed (Content-Length or chunked), it is counted as it comes.
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                raise BodyTooLarge(f"The body is larger than {self._max_body} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _call(self, environ: dict) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        started: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]], exc_info=None):
            started["status"] = int(status.split(" ", 1)[0])
            started["headers"] = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]

        iterable = self.app(environ, start_response)
        try:
            content = b"".join(iterable)
        finally:
            if hasattr(iterable, "close"):
                iterable.close()
        return started["status"], started["headers"], content


async def _send_parked(receive, send, status: int, headers: list, parked: Parked) -> None:
    """Send the parked body as it comes; the status goes with its first chunk, so
    that a failure before it is still a proper error answer. A client that
    leaves ends the wait at once and frees its place."""
    gone = asyncio.ensure_future(_disconnected(receive))
    following: asyncio.Future | None = None
    started = False
    try:
        while True:
            following = asyncio.ensure_future(anext(parked.chunks))
            await asyncio.wait({following, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not following.done():
                return
            try:
                chunk = following.result()
            except StopAsyncIteration:
                break
            except AsyncprocError as exc:
                if started:
                    log.warning("a parked response ended early: %s", exc.message)
                    return
                await _send_error(send, exc)
                return
            if not started:
                started = True
                await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        gone.cancel()
        if following is not None and not following.done():
            following.cancel()
            await asyncio.wait({following})
        await parked.chunks.aclose()
        parked.release()


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_error(send, error: AsyncprocError) -> None:
    body = json.dumps(error.to_dict()).encode()
    headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
    headers += [(name.lower().encode(), value.encode()) for name, value in error.headers().items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _environ(scope: dict, body: bytes) -> dict:
    server = scope.get("server") or ("localhost", 80)
    client = scope.get("client") or ("", 0)
    environ = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": "",
        # WSGI carries the path as latin-1 code points of its bytes (PEP 3333).
        "PATH_INFO": scope["path"].encode("utf-8").decode("latin-1"),
        "QUERY_STRING": scope["query_string"].decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": f"HTTP/{scope['http_version']}",
        "REMOTE_ADDR": client[0],
        "REMOTE_PORT": str(client[1]),
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1").upper().replace("-", "_")
        value = raw_value.decode("latin-1")
        if name == "CONTENT_TYPE":
            environ["CONTENT_TYPE"] = value
            continue
        if name in ("CONTENT_LENGTH", "TRANSFER_ENCODING"):
            # The body is whole by now; CONTENT_LENGTH above says how long.
            continue
        key = "HTTP_" + name
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


class _Protocol(gunicorn_protocol.ASGIProtocol):
    """gunicorn's connection handler, with our limits on slow and numerous clients."""

    _address: str | None = None
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        settings: Settings = self.worker.app.settings
        peer = transport.get_extra_info("peername")
        address = peer[0] if isinstance(peer, tuple) else None
        if address is not None and not is_trusted_proxy(address, settings.trusted_proxies):
            self._address = address
            counts: Counter[str] = self.worker.connections_by_address
            counts[address] += 1
            if counts[address] > settings.max_connections_per_address:
                self._send_error_response(429, f"Too many connections from {address}")
                self._close_transport()
                return
        self._header_timer = self.worker.loop.call_later(settings.header_timeout_seconds, self._headers_too_slow)

    def _on_headers_complete(self):
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        return super()._on_headers_complete()

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._current_request is None and not self._closed:
            self._send_error_response(408, "The request headers did not arrive in time")
            self._close_transport()
            # Let the connection's task see that it is closed.
            self._request_ready.set()

    def connection_lost(self, exc) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if self._address is not None:
            counts: Counter[str] = self.worker.connections_by_address
            counts[self._address] -= 1
            if counts[self._address] <= 0:
                del counts[self._address]
            self._address = None
        super().connection_lost(exc)

    def _send_error_response(self, status, message, extra_headers=()) -> None:
        # gunicorn's own answers (a malformed request line, headers too large)
        # in the JSON shape of every other error.
        body = json.dumps(error_body(HTTP_CODES.get(status, "http_error"), message)).encode()
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Error"
        extra = "".join(f"{name}: {value}\r\n" for name, value in extra_headers)
        head = (
            f"HTTP/1.1 {status} {reason}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"{extra}"
            "Connection: close\r\n\r\n"
        )
        self._safe_write(head.encode("latin-1") + body)


class Worker(gasgi.ASGIWorker):
    """gunicorn's asyncio worker, serving each connection with _Protocol."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.connections_by_address: Counter[str] = Counter()

    async def _shutdown(self) -> None:
        # Parked clients would hold the graceful shutdown to its timeout: answer them first.
        self.asgi.app.extensions["asyncproc"].waiters.stop_waiting()
        await super()._shutdown()

    def init_process(self) -> None:
        # The worker builds its connections from this module-level name; it has no setting for it.
        gasgi.ASGIProtocol = _Protocol
        super().init_process()

    async def _serve(self) -> None:
        # Every worker process waits on the one listening socket, and asyncio accepts
        # up to `backlog` waiting connections each time it wakes: the first process to
        # wake took them all (16 keep-alive clients: 16 on one process, none on the
        # other, which idled while the first ran out of CPU). Accepting one per wake
        # gives the other processes a chance at the next. The kernel's accept queue
        # keeps its configured length: listen() again after asyncio's own.
        create_server = self.loop.create_server

        async def accepting_one_per_wake(*args: Any, **kwargs: Any) -> asyncio.AbstractServer:
            server = await create_server(*args, **kwargs, backlog=1)
            kwargs["sock"].listen(self.cfg.backlog)
            return server

        self.loop.create_server = accepting_one_per_wake
        await super()._serve()
