"""Run a module (`-m NAME`) or a script as `__main__`, then write this process's own peak RSS to $BENCH_PEAK_FILE.

    python _child.py -m batcher run SPEC ...        python _child.py bare.py --child ...

Why not `ru_maxrss` from wait4: Linux keeps a process's maxrss across fork and exec, so a child spawned by a
benchmark that once held a large table reports the benchmark's peak, not its own. `VmHWM` in /proc/self/status
is the high-water mark of this process's own address space (the one exec made), read here as the program ends.
"""

from __future__ import annotations

import os
import runpy
import sys


def _vmhwm_kb() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def main() -> None:
    args = sys.argv[1:]
    out = os.environ.pop("BENCH_PEAK_FILE", None)
    try:
        if args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = args
            sys.path.insert(0, os.path.dirname(os.path.abspath(args[0])))
            runpy.run_path(args[0], run_name="__main__")
    finally:
        kb = _vmhwm_kb()
        if out and kb is not None:
            with open(out, "w", encoding="ascii") as f:
                f.write(str(kb))


if __name__ == "__main__":
    main()
