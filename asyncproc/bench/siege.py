"""Figure 12's crowd: long polls on a task that does not finish, and clients
sending their request a few bytes at a time.

It runs in a process of its own, so that its event loop never competes with
the client that measures POST /process for the GIL.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys


def _loopback(group: int, index: int) -> str:
    """A loopback source address of its own per client: caps are per address."""
    return f"127.{group}.{1 + index // 250}.{1 + index % 250}"


async def _waiter(port: int, index: int, path: str, stop: asyncio.Event, early: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(_loopback(10, index), 0))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    try:
        reading = asyncio.ensure_future(reader.read(1))
        await asyncio.wait({reading, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if reading.done():
            early.append(index)
        reading.cancel()
    finally:
        writer.close()


async def _slow_client(port: int, index: int, stop: asyncio.Event) -> None:
    """Half stuck in the headers, half in the body; starts over when cut off."""
    head = b"POST /process HTTP/1.1\r\nHost: bench\r\n"
    if index % 2:
        head += b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
    while not stop.is_set():
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(_loopback(20, index), 0))
        try:
            writer.write(head)
            while not stop.is_set():
                try:
                    await asyncio.wait_for(reader.read(65536), 0.5)
                    break  # an answer (408) or the end: the server let go of us
                except TimeoutError:
                    writer.write(b" " if index % 2 else b"X-Slow: 1\r\n")
        except ConnectionError:
            pass
        finally:
            writer.close()


async def _main(port: int, task_id: str, waiters: int, slow: int) -> int:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    early: list[int] = []
    path = f"/results/{task_id}?wait=60"
    tasks = [asyncio.ensure_future(_waiter(port, index, path, stop, early)) for index in range(waiters)]
    tasks += [asyncio.ensure_future(_slow_client(port, index, stop)) for index in range(slow)]
    # Every connection open and its request sent before the measurement starts.
    await asyncio.sleep(1.0)
    print("ready", flush=True)
    await asyncio.gather(*tasks)
    print(f"answered early: {len(early)}", flush=True)
    return 1 if early else 0


class Siege:
    """The crowd, in a child process, for the length of a with block."""

    def __init__(self, port: int, task_id: str, waiters: int, slow: int):
        self._command = [sys.executable, "-m", "asyncproc.bench.siege", str(port), task_id, str(waiters), str(slow)]
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> "Siege":
        self._process = subprocess.Popen(self._command, stdout=subprocess.PIPE, text=True)
        if self._process.stdout.readline().strip() != "ready":
            self._process.kill()
            raise RuntimeError(f"the siege did not start (exit {self._process.wait()})")
        return self

    def __exit__(self, *exc_info) -> None:
        self._process.send_signal(signal.SIGTERM)
        out, _ = self._process.communicate(timeout=30)
        if self._process.returncode != 0:
            raise RuntimeError(f"the siege failed (exit {self._process.returncode}): {out.strip()}")


if __name__ == "__main__":
    port, task_id, waiters, slow = sys.argv[1:]
    sys.exit(asyncio.run(_main(int(port), task_id, int(waiters), int(slow))))
