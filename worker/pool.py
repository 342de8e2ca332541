"""A supervised pool of child processes that run sync handlers, one task per child at a time.

Celery's prefork pool, in small: a handler that crashes its process (a
segfault, os._exit, the OOM killer), hangs past its time limit, grows past its
memory limit or ignores a cancellation costs its own attempt and its own child,
never the worker. A dead or killed child is replaced on demand.

Children are forked by a fork server (multiprocessing's "forkserver"), a
single-threaded process that has imported the handlers once, so that a child
starts in milliseconds and never inherits the worker's threads, locks or
database connections. Each child talks to the worker over a socket pair:
length-prefixed pickles, progress reports on the way back, and a shared event
for the cooperative stop that ctx.should_stop() reads.

A child never outlives its worker: it asks the kernel for SIGKILL when its
parent, the fork server, exits, and the fork server exits with the worker. A
stop kills and reaps the child before run() returns, so the outcome the runner
writes next (a retry included) never overlaps a still-running attempt. Nor
does a child outlive its worker's lease (worker/lease.py): it reads the
lease's deadline from shared memory and ends itself once it has passed, even
when the worker itself is frozen and cannot kill it.
"""

from __future__ import annotations

import asyncio
import ctypes
import inspect
import math
import multiprocessing
import os
import pickle
import resource
import signal
import socket
import struct
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import forkserver
from typing import Any, Callable

from asyncproc.config import SecondsRange
from asyncproc.operations import PermanentError, TaskContext, load_user_module, registry
from worker.forkserver_adapter import close_inherited_alive_pipe

# The cooperative part of a stop: a handler that checks ctx.should_stop() has
# this long to return before it is killed; a cancel must stop it within 1 s.
STOP_GRACE_SECONDS = 0.5
_HEADER = struct.Struct("!Q")
_PR_SET_PDEATHSIG = 1
# A child that ends itself because its worker's lease lapsed exits with this.
LEASE_LAPSED_EXIT = 86
# How often a child looks at the lease's deadline, at the most.
_LEASE_CHECK_SECONDS = 0.1
# How many children a call is offered to when each turns out dead before it
# took the call (an idle child killed, or one that ended itself with the lease).
START_TRIES = 3


class AttemptStopped(Exception):
    """A handler's attempt ended by force: `kind` is crash, timeout or memory."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class HandlerError(Exception):
    """An exception a handler raised in its child, carried back by type name and text."""

    def __init__(self, type_name: str, message: str):
        super().__init__(message)
        self.type_name = type_name


class PermanentHandlerError(HandlerError, PermanentError):
    """A PermanentError raised in a child: retrying cannot help."""


class _NotStarted(Exception):
    """The child died before it took the call: the handler never ran, and another child may take it."""


@dataclass(frozen=True)
class Call:
    """What a child needs to run one attempt."""

    operation: str
    payload: dict[str, Any]
    task_id: Any
    attempt: int
    max_attempts: int
    request_id: str | None
    compute_seconds: SecondsRange
    memory_mb: int | None
    # The worker writes one progress report per interval at most; the child
    # sends no more than that over the socket.
    progress_interval_seconds: float = 0.0


# -- the child's side ---------------------------------------------------------


class _Channel:
    """Length-prefixed messages over a blocking socket (the child's end)."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self._lock:
            self._sock.sendall(_HEADER.pack(len(data)) + data)

    def receive(self) -> bytes:
        (size,) = _HEADER.unpack(self._exactly(_HEADER.size))
        return self._exactly(size)

    def _exactly(self, size: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < size:
            chunk = self._sock.recv(min(size - len(chunks), 1 << 20))
            if not chunk:
                raise EOFError
            chunks += chunk
        return bytes(chunks)


def _die_with_parent() -> None:
    """Be killed when the fork server, this child's parent, exits: it exits with the worker.

    The fork server exits when the last holder of its "alive" pipe closes it.
    Every child inherits a copy, which would keep the fork server, and so this
    child, alive after the worker's death: the child closes its copy.
    """
    close_inherited_alive_pipe()
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        os._exit(1)


def _watch_lease(deadline: Any) -> None:
    """End this process once the worker's lease has lapsed (a monotonic deadline, shared with the worker)."""
    while True:
        remaining = deadline.value - time.monotonic()
        if remaining <= 0:
            os._exit(LEASE_LAPSED_EXIT)
        time.sleep(min(remaining, _LEASE_CHECK_SECONDS))


def _child_main(sock: socket.socket, stop_event: Any, lease_deadline: Any, operations_module: str | None) -> None:
    _die_with_parent()
    threading.Thread(target=_watch_lease, args=(lease_deadline,), name="lease-watch", daemon=True).start()
    # The worker decides when its handlers stop: a Ctrl-C or a SIGTERM sent to
    # the whole process group must not cut them short before the grace period.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    load_user_module(operations_module)
    channel = _Channel(sock)
    while True:
        try:
            request = channel.receive()
        except (EOFError, OSError):
            return
        answer, retire = _run_one(request, channel, stop_event)
        try:
            data = pickle.dumps(answer)
        except Exception as exc:  # pickling runs the result's own code, which may raise anything
            problem = f"the handler's result cannot be sent back to the worker: {type(exc).__name__}: {exc}"
            data = pickle.dumps(("error", "ResultNotTransferable", problem, True))
        channel.send(data)
        if retire:
            return


def _run_one(request: bytes, channel: _Channel, stop_event: Any) -> tuple[tuple, bool]:
    """(answer, retire): retire when the child's state can no longer be trusted."""
    try:
        call: Call = pickle.loads(request)
    except (pickle.UnpicklingError, RecursionError, ValueError) as exc:  # nesting deeper than here
        return ("error", "PayloadNotTransferable", f"the payload cannot be passed to the handler: {exc}", True), False

    last_sent = -math.inf

    def report(percent: int, message: str | None) -> None:
        nonlocal last_sent
        now = time.monotonic()
        if now - last_sent >= call.progress_interval_seconds:
            last_sent = now
            channel.send(pickle.dumps(("progress", percent, message)))

    ctx = TaskContext(
        task_id=call.task_id,
        attempt=call.attempt,
        max_attempts=call.max_attempts,
        request_id=call.request_id,
        compute_seconds=call.compute_seconds,
        progress_sink=report,
        stop_event=stop_event,
    )
    handler = registry.get(call.operation)
    if handler is None:
        return ("error", "UnknownOperation", f"operation {call.operation!r} is unknown in the handler process", True), False
    # From here on the handler runs: a death after this costs the attempt, one before it does not.
    channel.send(pickle.dumps(("started",)))
    try:
        limit = _limit_memory(call.memory_mb)
        try:
            if inspect.iscoroutinefunction(handler):
                result = asyncio.run(handler(call.payload, ctx))
            else:
                result = handler(call.payload, ctx)
        finally:
            _restore_memory(limit)
    except MemoryError:
        if call.memory_mb is None:
            return ("memory", "the handler ran out of memory"), True
        return ("memory", f"the handler went past its memory limit of {call.memory_mb} MB"), True
    except BaseException as exc:  # a handler's sys.exit() fails its attempt, not the child
        return ("error", type(exc).__name__, str(exc), isinstance(exc, PermanentError)), False
    return ("done", result), False


def _limit_memory(memory_mb: int | None) -> tuple[int, int] | None:
    """Cap the address space at what the child uses now plus memory_mb; the old limit."""
    if memory_mb is None:
        return None
    old = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as statm:
        in_use = int(statm.read().split()[0]) * resource.getpagesize()
    cap = in_use + memory_mb * 1024 * 1024
    if old[1] != resource.RLIM_INFINITY:
        cap = min(cap, old[1])
    resource.setrlimit(resource.RLIMIT_AS, (cap, old[1]))
    return old


def _restore_memory(old: tuple[int, int] | None) -> None:
    if old is not None:
        resource.setrlimit(resource.RLIMIT_AS, old)


# -- the worker's side --------------------------------------------------------


class _Child:
    def __init__(self, process: multiprocessing.process.BaseProcess, sock: socket.socket, stop_event: Any):
        self.process = process
        self.stop_event = stop_event
        self.sock = sock
        self.messages: asyncio.Queue[tuple | None] = asyncio.Queue()
        self.alive = True
        # Why the child's messages stopped other than by its death, if they did.
        self.failure: str | None = None
        # Whether the child has taken the current call and started its handler.
        self.started = False
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pump: asyncio.Task | None = None

    async def open(self) -> None:
        self._reader, self._writer = await asyncio.open_unix_connection(sock=self.sock)
        self._pump = asyncio.create_task(self._read_all(), name=f"handler-process-{self.process.pid}")

    async def _read_all(self) -> None:
        # One reader per child, so that a wait cut short by a time limit or a
        # cancel never leaves half a message in the stream.
        assert self._reader is not None
        try:
            while True:
                (size,) = _HEADER.unpack(await self._reader.readexactly(_HEADER.size))
                self.messages.put_nowait(pickle.loads(await self._reader.readexactly(size)))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except Exception as exc:  # an answer that cannot be unpickled here
            self.failure = f"the handler's result cannot be read by the worker: {exc}"
        self.alive = False
        self.messages.put_nowait(None)

    async def send(self, data: bytes) -> None:
        assert self._writer is not None
        self._writer.write(_HEADER.pack(len(data)) + data)
        await self._writer.drain()

    async def answer(self, on_progress: Callable[[int, str | None], None]) -> tuple | None:
        """The child's answer to the current call, or None when it died."""
        while True:
            message = await self.messages.get()
            if message is None:
                self.messages.put_nowait(None)
                return None
            if message[0] == "started":
                self.started = True
            elif message[0] == "progress":
                on_progress(message[1], message[2])
            else:
                return message

    def kill(self) -> None:
        self.alive = False
        if self.process.exitcode is None:
            try:
                os.kill(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def reap(self) -> int | None:
        """Wait until the child is dead and reaped; its exit code."""
        if self.process.exitcode is not None:
            self.close()
            return self.process.exitcode
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        sentinel = self.process.sentinel
        loop.add_reader(sentinel, lambda: exited.done() or exited.set_result(None))
        try:
            await exited
        finally:
            loop.remove_reader(sentinel)
        self.process.join()
        self.close()
        return self.process.exitcode

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._pump is not None:
            self._pump.cancel()


class ProcessPool:
    """Children that run one call each at a time; at most `size` are kept idle."""

    def __init__(self, operations_module: str | None, size: int):
        self._operations_module = operations_module
        self._size = size
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(_preload(operations_module))
        self._idle: list[_Child] = []
        self._busy: set[_Child] = set()
        # The worker's lease deadline (time.monotonic(), which every process
        # on the machine shares), read by each child.
        self._lease_deadline = self._context.Value("d", math.inf, lock=False)
        # Process.start() blocks (it talks to the fork server); one thread keeps
        # it off the event loop and serialises multiprocessing's bookkeeping.
        self._starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="handler-process-starter")

    @property
    def running(self) -> int:
        return len(self._busy)

    def set_lease_deadline(self, deadline: float) -> None:
        self._lease_deadline.value = deadline

    def kill_all(self) -> int:
        """SIGKILL every child now, from any thread (the lease's fence); how many were busy."""
        busy = list(self._busy)
        for child in busy + list(self._idle):
            child.kill()
        return len(busy)

    async def open(self) -> None:
        """Start the fork server now, so that the first task does not wait for it."""
        await asyncio.get_running_loop().run_in_executor(self._starter, forkserver.ensure_running)

    async def run(
        self,
        call: Call,
        timeout: float | None,
        on_progress: Callable[[int, str | None], None],
    ) -> Any:
        """Run one call in a child; its result, or the handler's exception, or AttemptStopped."""
        try:
            request = pickle.dumps(call)
        except (pickle.PicklingError, RecursionError, TypeError, ValueError) as exc:  # deep nesting: RecursionError
            raise PermanentHandlerError(
                "PayloadNotTransferable", f"the payload cannot be passed to the handler's process: {exc}"
            ) from None
        for _ in range(START_TRIES - 1):
            try:
                return await self._run_once(call, request, timeout, on_progress)
            except _NotStarted:
                continue
        try:
            return await self._run_once(call, request, timeout, on_progress)
        except _NotStarted as exc:
            raise AttemptStopped("crash", f"the handler's process died before it started: {exc}") from None

    async def _run_once(
        self, call: Call, request: bytes, timeout: float | None, on_progress: Callable[[int, str | None], None]
    ) -> Any:
        child = await self._take()
        self._busy.add(child)
        try:
            return await self._run_in(child, call, request, timeout, on_progress)
        finally:
            self._busy.discard(child)
            if child.alive and len(self._idle) < self._size:
                self._idle.append(child)
            elif child.alive:
                child.kill()
                await child.reap()

    async def _run_in(
        self, child: _Child, call: Call, request: bytes, timeout: float | None, on_progress: Callable
    ) -> Any:
        child.stop_event.clear()
        child.started = False
        limit = asyncio.timeout(timeout)
        try:
            async with limit:
                await child.send(request)
                answer = await child.answer(on_progress)
        except TimeoutError:
            if not limit.expired():
                raise
            await self._stop(child, on_progress)
            raise AttemptStopped("timeout", f"the handler hit its time limit of {timeout:g}s and was stopped") from None
        except asyncio.CancelledError:
            # A cancel of the task, or a shutdown past its grace period.
            await self._stop(child, on_progress)
            raise
        except (ConnectionError, OSError):
            answer = None
        if answer is None:
            if child.failure is not None:
                child.kill()
                await child.reap()
                raise PermanentHandlerError("ResultNotTransferable", child.failure)
            # Its socket closed: it is dead or dying, unless the handler closed
            # the socket itself; either way it is not to be waited for.
            child.kill()
            code = await child.reap()
            if not child.started:
                raise _NotStarted(_exit_reason(code))
            raise AttemptStopped("crash", f"the handler's process died: {_exit_reason(code)}")
        kind = answer[0]
        if kind == "done":
            return answer[1]
        if kind == "memory":
            child.kill()
            await child.reap()
            raise AttemptStopped("memory", answer[1])
        _, type_name, message, permanent = answer
        error = PermanentHandlerError if permanent else HandlerError
        raise error(type_name, message)

    async def _stop(self, child: _Child, on_progress: Callable) -> None:
        """Ask the handler to stop, then kill its child; returns once it is reaped or idle again."""
        child.stop_event.set()
        stopped = False
        try:
            async with asyncio.timeout(STOP_GRACE_SECONDS):
                answer = await child.answer(on_progress)
                # After a memory answer the child exits by itself.
                stopped = answer is not None and answer[0] != "memory"
        except TimeoutError:
            pass
        finally:
            if not stopped:
                child.kill()
                try:
                    await child.reap()
                except asyncio.CancelledError:
                    # Cancelled again while reaping: the SIGKILL is already sent.
                    child.process.join(1)
                    raise

    async def _take(self) -> _Child:
        while self._idle:
            child = self._idle.pop()
            if child.alive:
                return child
            await child.reap()
        return await self._start()

    async def _start(self) -> _Child:
        ours, theirs = socket.socketpair()
        stop_event = self._context.Event()
        process = self._context.Process(
            target=_child_main,
            args=(theirs, stop_event, self._lease_deadline, self._operations_module),
            name="asyncproc-handler",
        )
        starting = asyncio.get_running_loop().run_in_executor(self._starter, process.start)
        try:
            await asyncio.shield(starting)
        except asyncio.CancelledError:
            # A cancel of the task, or a shutdown, while the process starts: the
            # start goes on in the starter thread, and a process nobody tracks
            # would outlive its task and hold the worker's exit. Stop it.
            await asyncio.wait({starting})
            if process.pid is not None:
                child = _Child(process, ours, stop_event)
                child.kill()
                await child.reap()
            raise
        finally:
            theirs.close()
        child = _Child(process, ours, stop_event)
        try:
            await child.open()
        except asyncio.CancelledError:
            child.kill()
            await child.reap()
            raise
        return child

    async def close(self) -> None:
        """Stop every child: the idle ones now; busy ones were stopped by their runs."""
        children = self._idle + list(self._busy)
        self._idle = []
        for child in children:
            child.kill()
        for child in children:
            await child.reap()
        self._starter.shutdown(wait=True)


def _preload(operations_module: str | None) -> list[str]:
    """What the fork server imports once, so that each child starts with it.

    A child also re-runs the worker's main module (`python -m asyncproc.cli`),
    as every multiprocessing child does; with the modules it imports preloaded,
    that costs the child nothing. (Preloading the main module itself would make
    runpy warn in every child that it is already imported.)
    """
    modules = ["worker.pool"]
    if operations_module:
        modules.append(operations_module)
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None):
        for value in vars(main).values():
            name = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
            if isinstance(name, str) and name != "__main__" and name not in modules:
                modules.append(name)
    return modules


def _exit_reason(code: int | None) -> str:
    if code == LEASE_LAPSED_EXIT:
        return "stopped itself: its worker's lease lapsed (the database did not answer in time)"
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exited with code {code}"
