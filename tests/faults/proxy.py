"""A loopback TCP proxy that can go silent: a half-open connection on demand.

While cut, it reads and discards every byte in both directions and never
closes a socket, so both ends see a connection that is up but never answers,
as after a partition or a dead NAT entry. New connections are accepted and
then ignored in the same way.
"""

from __future__ import annotations

import asyncio
import threading


class SilentProxy:
    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = 0
        self.accepted = 0
        self.accepted_while_cut = 0
        self.dropped_bytes = 0
        self._cut = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="silent-proxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._writers: list[asyncio.StreamWriter] = []

    def start(self) -> "SilentProxy":
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", 0), self._loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()
            pumps = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for writer in self._writers:
                writer.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def cut(self) -> None:
        self._cut = True

    def heal(self) -> None:
        self._cut = False

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.append(client_writer)
        if self._cut:
            self.accepted_while_cut += 1
            await self._discard(client_reader)
            return
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.append(server_writer)
        await asyncio.gather(
            self._pump(client_reader, server_writer),
            self._pump(server_reader, client_writer),
        )

    async def _discard(self, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(65536):
            self.dropped_bytes += len(data)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await _read(reader):
            if self._cut:
                self.dropped_bytes += len(data)
                continue
            writer.write(data)
            await writer.drain()
        # An end closed during a cut is never told to the other end: the
        # partition swallows the FIN as well.
        if not self._cut:
            writer.close()


async def _read(reader: asyncio.StreamReader) -> bytes:
    """The next bytes, or b"" at the end; a reset ends a stream as a close does."""
    try:
        return await reader.read(65536)
    except ConnectionResetError:
        return b""
