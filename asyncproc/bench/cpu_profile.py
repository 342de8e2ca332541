"""`python -m asyncproc.bench.cpu_profile OUT ARGS...`: `asyncproc ARGS...` under cProfile, timed by CPU.

`python -m cProfile` times by the wall clock. On a busy two-core machine a
send() on a local socket wakes its reader, which may take the core at once,
and the sender's send() then "lasted" until it got the core back: a
profile of the worker by wall time put half of it in sends. The main
thread's CPU clock counts only what that thread computed.
"""

from __future__ import annotations

import cProfile
import sys
import time

from asyncproc import cli


def main() -> int:
    out, *arguments = sys.argv[1:]
    profiler = cProfile.Profile(time.thread_time)
    profiler.enable()
    try:
        return cli.main(arguments)
    finally:
        profiler.disable()
        profiler.dump_stats(out)


if __name__ == "__main__":
    sys.exit(main())
