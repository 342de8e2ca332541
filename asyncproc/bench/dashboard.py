"""`asyncproc bench --dashboard ROWS`: the dashboard's pages over HTTP with ROWS tasks in the ledger.

Prints, per page, the server time (the page's Server-Timing header) and the
time to the last byte at the client, as median and p99 of repeated loads.
The target is the issue's: each page under 200 ms of server time.
"""

from __future__ import annotations

import http.client
import re
import sys
import time
from typing import TextIO

from asyncproc.bench.figures import p50_p99
from asyncproc.bench.harness import Harness
from asyncproc.config import Settings

TARGET_MS = 200.0
PAGES = [
    "/dashboard",
    "/dashboard/tasks",
    "/dashboard/tasks?status=completed&operation=bench.noop",
    "/dashboard/tasks?status=failed",
    "/dashboard/operations",
    "/dashboard/workers",
    "/dashboard/tasks/bulk?action=retry&status=failed",
]
_DURATION = re.compile(r"dur=([0-9.]+)")
_NEXT = re.compile(r'id="next-page" href="([^"]+)"')
_TASK = re.compile(r'class="task-link[^"]*" href="([^"]+)"')


def _get(connection: http.client.HTTPConnection, path: str) -> tuple[float, float, str]:
    """(server ms, client ms, body) of one GET."""
    start = time.perf_counter()
    connection.request("GET", path)
    response = connection.getresponse()
    body = response.read().decode()
    client_ms = (time.perf_counter() - start) * 1000
    if response.status != 200:
        raise RuntimeError(f"GET {path} answered {response.status}")
    return float(_DURATION.search(response.headers["Server-Timing"]).group(1)), client_ms, body


def run(settings: Settings, rows: int, samples: int = 20, out: TextIO = sys.stdout) -> int:
    h = Harness(settings, concurrency=1)
    try:
        h.start()
        print(f"seeding a month of {rows:,} finished tasks ...", file=out, flush=True)
        seconds = h.seed_ledger(rows)
        print(f"seeded in {seconds:.1f} s", file=out, flush=True)
        connection = http.client.HTTPConnection("127.0.0.1", h.port, timeout=60)
        first_page = _get(connection, "/dashboard/tasks")[2]
        pages = [*PAGES, _TASK.search(first_page).group(1), _NEXT.search(first_page).group(1).replace("&amp;", "&")]
        print(f"| page, {rows:,} tasks | server p50 | server p99 | client p50 | client p99 | target |", file=out)
        print("|---|---|---|---|---|---|", file=out)
        for path in pages:
            _get(connection, path)  # warm, as a page someone keeps open is
            timings = [_get(connection, path)[:2] for _ in range(samples)]
            server = p50_p99([t[0] / 1000 for t in timings])
            client = p50_p99([t[1] / 1000 for t in timings])
            ok = server[0] * 1000 < TARGET_MS
            print(
                f"| {path} | {server[0] * 1000:.1f} ms | {server[1] * 1000:.1f} ms | {client[0] * 1000:.1f} ms "
                f"| {client[1] * 1000:.1f} ms | < {TARGET_MS:.0f} ms {'PASS' if ok else 'MISS'} |",
                file=out,
                flush=True,
            )
        return 0
    finally:
        h.close()
