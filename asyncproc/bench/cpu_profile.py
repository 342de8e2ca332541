"""`python -m asyncproc.bench.cpu_profile OUT MODULE ARGS...`: run MODULE as __main__ under cProfile, timed by CPU.

`python -m cProfile` times by the wall clock. On a busy two-core machine a
send() on a local socket wakes its reader, which may take the core at once,
and the sender's send() then "lasted" until it got the core back: a
profile of the worker by wall time put half of it in sends. The main
thread's CPU clock counts only what that thread computed.
"""

from __future__ import annotations

import cProfile
import runpy
import sys
import time


def main() -> int:
    out, module, *arguments = sys.argv[1:]
    sys.argv = [module, *arguments]
    profiler = cProfile.Profile(time.thread_time)
    code = 0
    profiler.enable()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
    finally:
        profiler.disable()
        profiler.dump_stats(out)
    return code


if __name__ == "__main__":
    sys.exit(main())
