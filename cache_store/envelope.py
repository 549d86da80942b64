"""The envelope every piece of a stream travels in between actors: msgpack-able metadata, KV pages
and numpy side arrays (zero-copy through Ray's object store).

Apart from cache_store.wire's formats because it needs neither torch nor the engine: the
coordinator builds and reads envelopes of visual tokens, and Ray unpickles an envelope by
importing this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from cache_store.pages import KVPage


@dataclass
class Wire:
    meta: dict  # msgpack-able
    pages: list[KVPage] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # side tensors, in the model dtype (bf16 as uint16)
    # an update's retained KV: its kept pages (list[KVPage]) inline, or a reference to them in the
    # object store, where every replica on the node maps the same copy (cache_store/wire.py)
    kept: Any = None

    @property
    def nbytes(self) -> int:
        """Bytes carried here (kept pages by reference: not counted)."""
        inline = self.kept if isinstance(self.kept, list) else []
        return sum(p.nbytes for p in [*self.pages, *inline]) + sum(a.nbytes for a in self.arrays.values())


def features_wire(tokens: np.ndarray | None, frames: list[tuple[int, int]], times: list[tuple[float, float]]) -> Wire:
    """Visual tokens [T, n, hidden] of T frames (or merged runs of frames, None when T is 0; with
    deepstack, Qwen3-VL, each unit's visual tokens and deepstack features stacked [T, 1 + k, n,
    hidden]) with their frame and time ranges: cache_store.wire's format of frame features and
    segments."""
    meta = [[[int(f[0]), int(f[1])], [float(t[0]), float(t[1])]] for f, t in zip(frames, times)]
    return Wire({"features": meta}, arrays={"features": tokens} if meta else {})
