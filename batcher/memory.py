"""Process-wide memory settings for a batcher run; the CLI applies them, since there the process is batcher's.

A run allocates in bursts of a few megabytes (an input batch turned into rows, the input check's id column, a
row group of the final write), each freed before the next. Two allocators keep such memory instead of giving
it back, and a long run's RSS then settles far above what it uses:

- Arrow's C++ default pool (mimalloc) keeps freed pages for reuse. The Parquet writer allocates from that pool
  whatever pyarrow is told, so only `ARROW_DEFAULT_MEMORY_POOL=system`, read once when pyarrow loads, moves
  it: measured, writing one 10,000-row group kept 16 MB on mimalloc and nothing on the system allocator.
- glibc's malloc raises its mmap threshold the first time a big block is freed, and from then on serves such
  blocks from a heap that fragments and never shrinks: on a 1,000,000-row run 190 MB were held through the
  call phase where 137 MB were needed. Pinning the threshold at its default (128 KiB) keeps big blocks
  mmapped, so freeing one returns it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["tune_process_memory"]

_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
_MMAP_THRESHOLD = 128 * 1024


def tune_process_memory() -> None:
    """Call before anything imports pyarrow (later, the Python-side pool still moves, the C++ one does not)."""
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")  # a user's own choice wins
    import pyarrow as pa

    if os.environ["ARROW_DEFAULT_MEMORY_POOL"] == "system":
        pa.set_memory_pool(pa.system_memory_pool())
    if sys.platform.startswith("linux"):
        _pin_mmap_threshold()


def _pin_mmap_threshold() -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to tune
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
