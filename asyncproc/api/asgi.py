"""The API's HTTP front: gunicorn's asyncio worker, with Flask on a few threads.

Every connection of a process lives on one event loop: headers and bodies are
read there, however slowly they come, and long polls and event streams wait
there (asyncproc.waiting). Only a request that has fully arrived takes one of
ASYNCPROC_API_THREADS threads, for the time Flask needs to answer it. So
thousands of waiting or slow clients leave the other requests' latency alone.

On top of gunicorn's worker: header and body read timeouts, a cap on
connections per client address, and errors in our JSON shape even when they
are raised before the request reaches Flask (400, 414, 431 from the parser).
All of it goes through gunicorn's public extension points (a worker class,
the asyncio.Protocol and ASGI interfaces) except the JSON shape of the
parser's errors, which only a private method can change: that one is
confined to asyncproc.api.gunicorn_adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import io
import json
import logging
import os
import signal
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Any, Awaitable, Iterable

from flask import Flask
from gunicorn.workers import gasgi

from asyncproc.api.clients import is_trusted_proxy
from asyncproc.api.gunicorn_adapter import http1_protocol
from asyncproc.config import ApiSettings
from asyncproc.errors import HTTP_CODES, AsyncprocError, BodyTooLarge, RequestTimeout, error_body
from asyncproc.waiting import Parked

log = logging.getLogger(__name__)

# Set in the WSGI environ: the loop a route may park its response on, and where it puts it.
LOOP_KEY = "asyncproc.loop"
PARKED_KEY = "asyncproc.parked"


class WsgiBridge:
    """An ASGI application running a WSGI one on a thread pool, with parked responses."""

    def __init__(self, app: Flask, settings: ApiSettings):
        self.app = app
        self._max_body = settings.max_body_bytes
        self._body_timeout = settings.body_timeout_seconds
        self._threads = ThreadPoolExecutor(settings.threads, thread_name_prefix="api")

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

    def stop_waiting(self) -> None:
        """The server is stopping: answer every parked client now, and any later one at once."""
        self.app.extensions["asyncproc"].waiters.stop_waiting()

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


def error_response(status: int, message: str, extra_headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """A whole HTTP/1.1 answer, in the JSON shape of every other error, to a
    request refused before it reached the app; the connection closes after it."""
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
    return head.encode("latin-1") + body


class _Connections:
    """The connections of one worker process: their limits, and which are open."""

    def __init__(self, worker: Worker, settings: ApiSettings):
        self.worker = worker
        self.settings = settings
        self.by_address: Counter[str] = Counter()
        self.open: set[_Connection] = set()
        self.none_open = asyncio.Event()
        self.none_open.set()

    def new(self) -> _Connection:
        return _Connection(self)


class HeadersEnd:
    """Finds where the headers of a connection's first request end, fed its bytes as they arrive.

    They end at the first empty line after the request line. A bare LF counts
    as a line's end too, as a parser may accept it (RFC 9112 section 2.2): this
    never finds their end later than gunicorn's parser does, so the header
    timeout never answers a request that is being served. Empty lines before
    the request line end nothing (ibid.).
    """

    def __init__(self) -> None:
        self._request_started = False
        self._last_bytes = b""

    def found_in(self, data: bytes) -> bool:
        """Whether the headers end in `data`, the bytes that follow those fed before."""
        if not self._request_started:
            data = data.lstrip(b"\r\n")
            if not data:
                return False
            self._request_started = True
        seen = self._last_bytes + data
        if b"\n\n" in seen or b"\n\r\n" in seen:
            return True
        self._last_bytes = seen[-2:]
        return False


class _Connection(asyncio.Protocol):
    """One client connection: gunicorn's HTTP/1 protocol inside our limits on slow and numerous clients.

    gunicorn's protocol is an asyncio.Protocol, and is driven here only through
    that interface: what it reads, writes and keeps is its own business.
    """

    def __init__(self, connections: _Connections):
        self._connections = connections
        self._transport: asyncio.Transport | None = None
        self._http: asyncio.Protocol | None = None
        self._address: str | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._headers_end = HeadersEnd()

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        connections = self._connections
        connections.open.add(self)
        connections.none_open.clear()
        settings = connections.settings
        peer = transport.get_extra_info("peername")
        address = peer[0] if isinstance(peer, tuple) else None
        if address is not None and not is_trusted_proxy(address, settings.trusted_proxies):
            self._address = address
            connections.by_address[address] += 1
            if connections.by_address[address] > settings.max_connections_per_address:
                # Refused before gunicorn ever sees it: it holds nothing of gunicorn's.
                self._refuse(429, f"Too many connections from {address}")
                return
        self._http = http1_protocol(connections.worker, error_response)
        self._http.connection_made(transport)
        self._header_timer = asyncio.get_running_loop().call_later(
            settings.header_timeout_seconds, self._headers_too_slow
        )

    def data_received(self, data: bytes) -> None:
        if self._http is None:
            return
        if self._header_timer is not None and self._headers_end.found_in(data):
            self._header_timer.cancel()
            self._header_timer = None
        self._http.data_received(data)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        timeout = self._connections.settings.header_timeout_seconds
        self._refuse(408, f"The request headers did not arrive within {timeout:g}s")

    def _refuse(self, status: int, message: str) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(error_response(status, message))
        # As gunicorn closes after its own errors: the answer goes out before the FIN.
        if transport.can_write_eof():
            transport.write_eof()
        transport.close()

    def eof_received(self) -> bool | None:
        return self._http.eof_received() if self._http is not None else None

    def pause_writing(self) -> None:
        if self._http is not None:
            self._http.pause_writing()

    def resume_writing(self) -> None:
        if self._http is not None:
            self._http.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        connections = self._connections
        if self._address is not None:
            connections.by_address[self._address] -= 1
            if connections.by_address[self._address] <= 0:
                del connections.by_address[self._address]
            self._address = None
        connections.open.discard(self)
        if not connections.open:
            connections.none_open.set()
        if self._http is not None:
            self._http.connection_lost(exc)


# How often a worker tells gunicorn's arbiter it is alive, and looks for a stop
# it was not signalled (max_requests reached, the arbiter gone).
HEARTBEAT_SECONDS = 1.0


class Worker(gasgi.ASGIWorker):
    """gunicorn's asyncio worker, serving its connections as _Connection.

    It keeps gunicorn's set-up of the process (event loop, application) and
    overrides the two methods gunicorn's base worker leaves to its subclasses:
    `init_signals` and `run`, the main loop.
    """

    def init_signals(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        # Double underscores: gunicorn's own attributes, present or future, cannot clash with ours.
        self.__stopping = asyncio.Event()
        self.__hurrying = asyncio.Event()
        # As gunicorn's arbiter means them: TERM stops gracefully, INT and QUIT at once.
        self.loop.add_signal_handler(signal.SIGTERM, self.__stop, False)
        self.loop.add_signal_handler(signal.SIGINT, self.__stop, True)
        self.loop.add_signal_handler(signal.SIGQUIT, self.__stop, True)
        self.loop.add_signal_handler(signal.SIGUSR1, self.log.reopen_files)
        self.loop.add_signal_handler(signal.SIGABRT, self.__abort)

    def __stop(self, hurry: bool) -> None:
        was_alive = self.alive
        self.alive = False
        self.__stopping.set()
        if hurry:
            self.__hurrying.set()
            if was_alive:
                self.cfg.worker_int(self)

    def __abort(self) -> None:
        # The arbiter found this worker silent past its timeout.
        self.alive = False
        self.cfg.worker_abort(self)
        sys.exit(1)

    def run(self) -> None:
        try:
            self.loop.run_until_complete(self.__serve())
        except Exception:
            self.log.exception("Worker exception")
        finally:
            self.__close()

    async def __serve(self) -> None:
        bridge: WsgiBridge = self.app.wsgi()
        connections = _Connections(self, self.app.settings.api)
        servers = []
        for listener in self.sockets:
            # Every worker process waits on the one listening socket, and asyncio accepts
            # up to `backlog` waiting connections each time it wakes: the first process to
            # wake took them all (16 keep-alive clients: 16 on one process, none on the
            # other, which idled while the first ran out of CPU). Accepting one per wake
            # gives the other processes a chance at the next. The kernel's accept queue
            # keeps its configured length: listen() again after asyncio's own.
            servers.append(await self.loop.create_server(connections.new, sock=listener.sock, backlog=1))
            listener.sock.listen(self.cfg.backlog)
            self.log.info("ASGI server listening on %s", listener)
        while self.alive:
            self.notify()
            if self.ppid != os.getppid():
                self.log.info("Parent changed, shutting down: %s", self)
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HEARTBEAT_SECONDS):
                    await self.__stopping.wait()
        self.log.info("Worker shutting down...")
        # Parked clients would hold the graceful shutdown to its timeout: answer them first.
        bridge.stop_waiting()
        for server in servers:
            server.close()
        if connections.open and not self.__hurrying.is_set():
            self.log.info("Waiting for %d connections to finish...", len(connections.open))
            finished = await _first_of(
                connections.none_open.wait(), self.__hurrying.wait(), timeout=self.cfg.graceful_timeout
            )
            if not finished:
                self.log.warning("Forcing close of %d connections", len(connections.open))

    def __close(self) -> None:
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(
                asyncio.wait(pending, timeout=1.0 if self.__hurrying.is_set() else None)
            )
        self.loop.close()
        for listener in self.sockets:
            listener.close()


async def _first_of(*awaitables: Awaitable[Any], timeout: float) -> bool:
    """Wait until one of `awaitables` is done, at most `timeout`; whether one was."""
    waiting = {asyncio.ensure_future(awaitable) for awaitable in awaitables}
    done, pending = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for future in pending:
        future.cancel()
    await asyncio.wait(waiting)
    return bool(done)
