"""A small HTTP/1.1 keep-alive load generator on asyncio.

It sends one fixed request over many connections for a fixed time and records
each latency. It also reports its own CPU time, so the table can show it was
not the bottleneck.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    @property
    def cpu_share(self) -> float:
        """The generator's CPU time per wall second: 1.0 is one core saturated."""
        return self.cpu_seconds / self.seconds if self.seconds else 0.0


def http_request(method: str, host: str, port: int, path: str, body: bytes = b"") -> bytes:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, keep-alive) after reading one whole response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    keep_alive = True
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection" and value.strip().lower() == "close":
            keep_alive = False
    if length:
        await reader.readexactly(length)
    return status, keep_alive


async def _client(host: str, port: int, request: bytes, expect: int, deadline: float, result: LoadResult) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            writer.write(request)
            status, keep_alive = await _read_response(reader)
            result.latencies.append(time.perf_counter() - start)
            if status != expect:
                result.errors += 1
            if not keep_alive:
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
    finally:
        writer.close()


async def _run(host: str, port: int, request: bytes, expect: int, connections: int, seconds: float) -> LoadResult:
    result = LoadResult()
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    deadline = wall_start + seconds
    await asyncio.gather(*(_client(host, port, request, expect, deadline, result) for _ in range(connections)))
    result.seconds = time.perf_counter() - wall_start
    result.cpu_seconds = time.process_time() - cpu_start
    return result


def load(host: str, port: int, request: bytes, expect: int, connections: int, seconds: float) -> LoadResult:
    return asyncio.run(_run(host, port, request, expect, connections, seconds))
