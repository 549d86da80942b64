"""Where a replica's KV lives: in the node's object store (shared by every process on the node)
or in the process's own memory. Read from /proc/self/maps (Linux): the object store is a shared
mapping of a file named plasma*; elsewhere everything reads as private.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.kv_store import regions

if TYPE_CHECKING:
    from pipeline.memory import StreamMemory


def _object_store_ranges() -> list[tuple[int, int]]:
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and "/plasma" in fields[5] and "s" in fields[1]:
                    low, high = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((low, high))
    except OSError:
        pass
    return ranges


def residence(memory: StreamMemory) -> dict[str, dict[str, int]]:
    """Bytes of each retained tier (StreamMemory.memory's, KV tiers only) in the object store
    ("shared") and in this process ("private"), each region counted once; "at": a fingerprint
    of where the tier's shared regions are in the store (their offsets), equal in two processes
    exactly when they map the same copies."""
    ranges, seen = _object_store_ranges(), set()
    tiers = {
        "sinks": [t for kv in memory.sinks for t in kv],
        "blocks": [t for b in memory.blocks for t in b.tensors()],
        "long_term": [t for p in memory.pools or [] for t in p.tensors()],
        "window": memory.window.tensors(),
    }
    out = {}
    for tier, tensors in tiers.items():
        shared = private = 0
        offsets = []
        for region in regions(tensors):
            if region in seen:
                continue
            seen.add(region)
            base = next((low for low, high in ranges if low <= region[0] < high), None)
            if base is not None:
                shared += region[1]
                offsets.append(region[0] - base)
            else:
                private += region[1]
        out[tier] = {"shared": shared, "private": private, "at": hash(tuple(sorted(offsets)))}
    return out
