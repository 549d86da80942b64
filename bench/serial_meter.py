"""Bytes each Ray process serializes and deserializes, counted inside the process: what a
benchmark reads as "payload through a process" whatever the transport.

Why not only the process's I/O counters (/proc/<pid>/io): Ray inlines objects under 100 KiB in
its gRPC messages (socket reads and writes, which rchar/wchar count) but puts larger ones in the
shared-memory object store, which a process writes and reads through mmap (no syscall bytes).
Every value a process sends or receives goes through its SerializationContext either way: task
arguments it sends and return values it stores (serialize), arguments it receives and results it
gets or awaits (deserialize_objects). ObjectRefs passed on unread cost their few bytes only.

Installed in every worker of a job by `ray.init(runtime_env={"worker_process_setup_hook":
HOOK, "env_vars": {METER_DIR_ENV: folder, ...}})`; each process writes its totals to
<folder>/<pid>.json whenever they changed (every WRITE_EVERY_S), and `read(folder)` collects
them. It wraps two methods of Ray's private SerializationContext (ray._private.serialization,
Ray 2.60): a Ray upgrade that renames them makes `install` raise, not count zero silently.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

HOOK = "bench.serial_meter.install"
METER_DIR_ENV = "STREAMKV_SERIAL_METER_DIR"
WRITE_EVERY_S = 0.2

_totals = {"serialized_bytes": 0, "serialized_objects": 0, "deserialized_bytes": 0, "deserialized_objects": 0}
_lock = threading.Lock()


def _count(key: str, nbytes: int, objects: int) -> None:
    with _lock:
        _totals[f"{key}_bytes"] += nbytes
        _totals[f"{key}_objects"] += objects


def install() -> None:
    """The worker_process_setup_hook: wrap serialization, start the writer thread."""
    from ray._private.serialization import SerializationContext

    serialize, deserialize = SerializationContext.serialize, SerializationContext.deserialize_objects

    def counted_serialize(self, value):
        serialized = serialize(self, value)
        _count("serialized", int(serialized.total_bytes), 1)
        return serialized

    def counted_deserialize(self, serialized_ray_objects, *args, **kwargs):
        sizes = [len(data) for data, *_ in serialized_ray_objects if data is not None]
        _count("deserialized", sum(sizes), len(sizes))
        return deserialize(self, serialized_ray_objects, *args, **kwargs)

    SerializationContext.serialize = counted_serialize
    SerializationContext.deserialize_objects = counted_deserialize
    folder = os.environ.get(METER_DIR_ENV)
    if folder:
        threading.Thread(target=_writer, args=(Path(folder) / f"{os.getpid()}.json",), daemon=True).start()


def _writer(path: Path) -> None:
    last = None
    while True:
        with _lock:
            now = dict(_totals)
        if now != last:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(now))
            tmp.replace(path)  # a reader never sees half a file
            last = now
        time.sleep(WRITE_EVERY_S)


def read(folder: Path, pid: int) -> dict[str, int]:
    """The totals process `pid` wrote last (zeros if it wrote none yet)."""
    try:
        return json.loads((Path(folder) / f"{pid}.json").read_text())
    except (OSError, ValueError):
        return {key: 0 for key in _totals}


def settled(folder: Path, pid: int) -> dict[str, int]:
    """The totals once the writer has caught up (a write period passed with no change)."""
    before = read(folder, pid)
    while True:
        time.sleep(3 * WRITE_EVERY_S)
        after = read(folder, pid)
        if after == before:
            return after
        before = after
