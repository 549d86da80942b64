"""Giving a deleted stream's memory back to the operating system, not only to the allocator.

Python and torch free a stream's objects when it is closed, but glibc's malloc keeps the freed
small-block heap (and its per-thread arenas) for reuse: a process's resident memory then stays at
its high-water mark. After a stream whose frames were large (a 4K source at source size: +176 MB
kept by the prefill actor, +385 MB by the coordinator after deletion, BENCHMARKS.md "Stream
churn") or after many streams (the coordinator's USS grew ~0.4 MiB per stream lifetime, and
`malloc_trim` gave all of the growth back: no object was left), `release_freed_memory` returns
the free pages. glibc only (Linux); elsewhere it does nothing.

A process with many threads that allocate (a decoder host: a decode thread per source and Ray's
pools of call threads) also spreads its heap over glibc's per-thread arenas, up to 8 per core,
each keeping its own high-water mark: `FEW_ARENAS` is the environment such a process is started
with (MALLOC_ARENA_MAX is read when the process starts, so it goes in the actor's runtime_env).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


# glibc's malloc arenas for a process of many short-lived threads (see the module docstring):
# measured on a decoder host, 200 sources through it: +93 KiB USS per source with glibc's default
# (16 arenas on 2 cores), flat after ~80 sources with 2 (BENCHMARKS.md "Stream churn")
FEW_ARENAS = {"MALLOC_ARENA_MAX": "2"}
# The model actors allocate a buffer the size of a segment's KV per commit (the kept pages, before
# they go to the object store) and attention plans per question. glibc raises its mmap threshold
# to the size of the largest buffer freed (up to 32 MiB), after which such buffers come from the
# heap, whose high-water mark fragmentation keeps: a prefill actor's heap grew ~0.5x the KV it
# committed (bench.pipeline_cost --size large). A fixed threshold keeps large buffers mmapped,
# given back when freed (measured: no growth beyond the KV in the object store).
LARGE_BUFFERS_MAPPED = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def with_env(options: dict, env: dict[str, str]) -> dict:
    """Ray actor `options` whose runtime_env sets `env` too (Ray merges it with the job's; the
    options' own env_vars win). glibc reads these when the process starts."""
    runtime_env = dict(options.get("runtime_env") or {})
    return {**options, "runtime_env": {**runtime_env, "env_vars": {**env, **runtime_env.get("env_vars", {})}}}


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
