"""Giving a deleted stream's memory back to the operating system, not only to the allocator.

Python and torch free a stream's objects when it is closed, but glibc's malloc keeps the freed
small-block heap (and its per-thread arenas) for reuse: a process's resident memory then stays at
its high-water mark. After a stream whose frames were large (a 4K source at source size: +176 MB
kept by the prefill actor, +385 MB by the coordinator after deletion, BENCHMARKS.md "Stream
churn") or after many streams (the coordinator's USS grew ~0.4 MiB per stream lifetime, and
`malloc_trim` gave all of the growth back: no object was left), `release_freed_memory` returns
the free pages. glibc only (Linux); elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> bool:
    """Hand the allocator's free pages back to the OS (milliseconds; call after freeing a
    stream, not per frame). True if the C library has malloc_trim and released something."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
