"""Process-wide memory settings for a batcher run; the CLI applies them, since there the process is batcher's.

A run allocates in bursts of a few megabytes (an input batch turned into rows, the input check's id column, a
row group of the final write), each freed before the next. Two allocators keep such memory instead of giving
it back, and a long run's RSS then settles far above what it uses:

- Arrow's C++ default pool (mimalloc) keeps freed pages for reuse. The Parquet writer allocates from that pool
  whatever pyarrow is told, so only `ARROW_DEFAULT_MEMORY_POOL=system`, read once when pyarrow loads, moves
  it: measured, writing one 10,000-row group kept 16 MB on mimalloc and nothing on the system allocator.
- glibc's malloc raises its mmap threshold the first time a big block is freed, and from then on serves such
  blocks from a heap that fragments and never shrinks: on a 1,000,000-row run 190 MB were held through the
  call phase where ~120 MB were needed. Pinning the threshold keeps big blocks mmapped, so freeing one
  returns it. Pinned at 264 KiB, not glibc's starting 128 KiB: asyncio reads every socket into a fresh
  256 KiB buffer and shrinks it to what arrived, and mmapped that would cost an mmap, an mremap and a munmap
  per read (strace, 3,000 rows: 3,000 mremaps and 3,400 mmaps at 128 KiB; none and 400 above 256 KiB).

Python's cyclic garbage collector is the third. Its youngest generation is collected after every 700 net new
container objects, and a run makes them in bursts (an input batch of rows and bodies, a journal batch of
records) that are freed soon after but trigger collections of the whole heap every few seconds; the heap is
mostly the ~55,000 objects of the imported modules, which are never garbage. Measured on a 20,000-row run at
latency 0: 1,260 collections and ~0.55 s, 13% of the process's CPU. A threshold of 10,000 and the imports
moved out of the collector's sight (`gc.freeze`) leave a few collections and ~5 ms; cycles still get
collected, after at most 10,000 new objects instead of 700.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys

__all__ = ["freeze_imports", "tune_process_memory"]

_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
_MMAP_THRESHOLD = 264 * 1024  # just above asyncio's 256 KiB socket read buffer (and its header)
_GC_YOUNG = 10_000  # Python's default: 700


def tune_process_memory() -> None:
    """Call before anything imports pyarrow (later, the Python-side pool still moves, the C++ one does not)."""
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")  # a user's own choice wins
    import pyarrow as pa

    if os.environ["ARROW_DEFAULT_MEMORY_POOL"] == "system":
        pa.set_memory_pool(pa.system_memory_pool())
    if sys.platform.startswith("linux"):
        _pin_mmap_threshold()
    gc.set_threshold(_GC_YOUNG, *gc.get_threshold()[1:])


def freeze_imports() -> None:
    """Once the modules a command needs are imported: keep their objects out of every later collection."""
    gc.collect()
    gc.freeze()


def _pin_mmap_threshold() -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to tune
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
