"""Per-stream frame thumbnails (small JPEGs) kept beside the segment index: one contract, an
in-process and a Redis backend.

Bounded per stream by thinning, not by forgetting the past: a stream keeps the thumbnails of the
frames whose index is a multiple of its `stride` (1 at first); when more than `capacity` would be
kept, the stride doubles and every other one goes. So however long a stream runs, its
thumbnails cover all of it evenly (at most `capacity`), and any frame (a segment's middle, an
answer's evidence) has one within stride / 2 frames: `nearest` finds it.

Redis layout, beside cache_store/index.py's (same namespace; the stream id in a hash tag, so a
stream's keys share a cluster slot; not under the index's `{ns}:{<stream>}:` prefix, so the
index's key counts stay its own):
    {ns}:thumbs:{<stream>}:f:<frame>   JPEG bytes
    {ns}:thumbs:{<stream>}:frames      sorted set of the kept frame numbers (score = frame)
    {ns}:thumbs:{<stream>}:stride      the stream's stride
One writer per stream (the coordinator's ThumbnailKeeper, actors/thumbnailer.py).
"""

from __future__ import annotations

import io
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import redis

from cache_store.index import _check_name, _glob_escape
from pipeline.errors import ConfigError, InvalidInputError

CAPACITY = 512  # thumbnails per stream (~3 KB each at MAX_SIDE 160)
MAX_SIDE = 160  # pixels of a thumbnail's longer side
QUALITY = 75


@dataclass(frozen=True)
class Thumbnail:
    frame: int  # the kept frame (nearest to the one asked for)
    jpeg: bytes


def encode_jpeg(frame: np.ndarray, max_side: int = MAX_SIDE, quality: int = QUALITY) -> bytes:
    """One uint8 [H, W, 3] frame as a JPEG whose longer side is at most `max_side`."""
    from PIL import Image

    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise InvalidInputError(f"a thumbnail needs a uint8 [H, W, 3] frame, got {frame.dtype} {frame.shape}")
    step = max(1, max(frame.shape[:2]) // (2 * max_side))  # a cheap subsample first (1080p: 6x)
    image = Image.fromarray(np.ascontiguousarray(frame[::step, ::step]))
    image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def thinned(stride: int, last: int, capacity: int) -> int:
    """The stride that keeps at most `capacity` thumbnails of frames up to `last`: `stride`
    doubled until the multiples of it in [0, last] are few enough."""
    while last // stride + 1 > capacity:
        stride *= 2
    return stride


class ThumbnailStore(ABC):
    """Contract: `wanted` says which frames of a run the stream keeps now; `add` keeps them
    (thinning the older ones); `nearest` reads the kept thumbnail nearest each frame asked for
    (None for a stream without thumbnails); `delete_stream` frees everything of the stream."""

    def __init__(self, capacity: int = CAPACITY):
        if capacity < 2:
            raise ConfigError(f"thumbnail capacity must be >= 2, got {capacity}")
        self.capacity = capacity

    def wanted(self, stream_id: str, first: int, count: int) -> list[int]:
        """Frames of [first, first + count) the stream keeps at its current stride."""
        stride = self.stride(stream_id)
        return [f for f in range(first, first + count) if f % stride == 0]

    @abstractmethod
    def stride(self, stream_id: str) -> int: ...

    @abstractmethod
    def add(self, stream_id: str, jpegs: dict[int, bytes]) -> None:
        """Keep these frames' thumbnails (each frame at most once; later frames than those kept)."""

    @abstractmethod
    def nearest(self, stream_id: str, frames: list[int]) -> list[Thumbnail | None]: ...

    @abstractmethod
    def frames(self, stream_id: str) -> list[int]:
        """The kept frames, ascending."""

    @abstractmethod
    def delete_stream(self, stream_id: str) -> int:
        """Free the stream's thumbnails; returns how many there were."""


def _closest(frame: int, candidates: list[int]) -> int | None:
    """The candidate nearest `frame` (the earlier one on a tie)."""
    return min(candidates, key=lambda c: (abs(c - frame), c), default=None)


class EmbeddedThumbnails(ThumbnailStore):
    """In-process and thread-safe."""

    def __init__(self, capacity: int = CAPACITY):
        super().__init__(capacity)
        self._lock = threading.Lock()
        self._data: dict[str, dict[int, bytes]] = {}
        self._stride: dict[str, int] = {}

    def stride(self, stream_id: str) -> int:
        with self._lock:
            return self._stride.get(stream_id, 1)

    def add(self, stream_id: str, jpegs: dict[int, bytes]) -> None:
        _check_name(stream_id, "stream id")
        with self._lock:
            kept = self._data.setdefault(stream_id, {})
            new = thinned(self._stride.get(stream_id, 1), max([*kept, *jpegs], default=0), self.capacity)
            kept.update((f, j) for f, j in jpegs.items() if f % new == 0)
            for frame in [f for f in kept if f % new]:
                del kept[frame]
            self._stride[stream_id] = new

    def nearest(self, stream_id: str, frames: list[int]) -> list[Thumbnail | None]:
        with self._lock:
            kept = self._data.get(stream_id, {})
            keys = sorted(kept)
            found = [_closest(f, keys[max(0, i - 1): i + 1]) for f, i in
                     ((f, int(np.searchsorted(keys, f))) for f in frames)]
            return [None if k is None else Thumbnail(k, kept[k]) for k in found]

    def frames(self, stream_id: str) -> list[int]:
        with self._lock:
            return sorted(self._data.get(stream_id, {}))

    def delete_stream(self, stream_id: str) -> int:
        with self._lock:
            self._stride.pop(stream_id, None)
            return len(self._data.pop(stream_id, {}))


class RedisThumbnails(ThumbnailStore):
    """Thumbnails in Redis (layout in the module doc)."""

    def __init__(self, client: redis.Redis | str, namespace: str = "streamkv", capacity: int = CAPACITY):
        super().__init__(capacity)
        self.r = redis.Redis.from_url(client) if isinstance(client, str) else client
        if self.r.connection_pool.connection_kwargs.get("decode_responses"):
            raise ConfigError("RedisThumbnails needs a client with decode_responses=False (JPEG bytes)")
        _check_name(namespace, "namespace")
        self.ns = namespace

    def _prefix(self, stream_id: str) -> str:
        _check_name(stream_id, "stream id")
        return f"{self.ns}:thumbs:{{{stream_id}}}:"

    def stride(self, stream_id: str) -> int:
        return int(self.r.get(self._prefix(stream_id) + "stride") or 1)

    def add(self, stream_id: str, jpegs: dict[int, bytes]) -> None:
        p = self._prefix(stream_id)
        pipe = self.r.pipeline(transaction=False)
        pipe.get(p + "stride")
        pipe.zrange(p + "frames", -1, -1)
        stride, last = pipe.execute()
        stride = int(stride or 1)
        new = thinned(stride, max([*(int(f) for f in last), *jpegs], default=0), self.capacity)
        adding = {f: j for f, j in jpegs.items() if f % new == 0}
        # thumbnails before the set that points at them (see cache_store/index.py)
        for frame, jpeg in adding.items():
            pipe.set(f"{p}f:{frame}", jpeg)
        if adding:
            pipe.zadd(p + "frames", {str(f): f for f in adding})
        if new != stride:
            gone = [int(f) for f in self.r.zrange(p + "frames", 0, -1) if int(f) % new]
            if gone:
                pipe.zrem(p + "frames", *[str(f) for f in gone])
                pipe.unlink(*[f"{p}f:{f}" for f in gone])
        pipe.set(p + "stride", new)
        pipe.execute()

    def nearest(self, stream_id: str, frames: list[int]) -> list[Thumbnail | None]:
        p = self._prefix(stream_id)
        pipe = self.r.pipeline(transaction=False)
        for f in frames:  # the kept frames on either side of each
            pipe.zrevrangebyscore(p + "frames", f, "-inf", start=0, num=1)
            pipe.zrangebyscore(p + "frames", f, "+inf", start=0, num=1)
        sides = pipe.execute()
        found = [_closest(f, [int(x) for x in sides[2 * i] + sides[2 * i + 1]]) for i, f in enumerate(frames)]
        values = self.r.mget([f"{p}f:{k}" for k in found if k is not None]) if any(k is not None for k in found) else []
        values = iter(values)
        out = []
        for k in found:
            jpeg = None if k is None else next(values)
            out.append(None if jpeg is None else Thumbnail(k, jpeg))  # (one expired or evicted: none)
        return out

    def frames(self, stream_id: str) -> list[int]:
        return [int(f) for f in self.r.zrange(self._prefix(stream_id) + "frames", 0, -1)]

    def delete_stream(self, stream_id: str) -> int:
        p = self._prefix(stream_id)
        thumbnails = self.r.zcard(p + "frames")
        keys = list(self.r.scan_iter(match=_glob_escape(p) + "*", count=1000))
        if keys:
            self.r.unlink(*keys)
        return thumbnails


def open_thumbnails(index_url: str | None, capacity: int = CAPACITY) -> ThumbnailStore:
    """The store beside the segment index: Redis at `index_url`, else embedded."""
    return RedisThumbnails(index_url, capacity=capacity) if index_url else EmbeddedThumbnails(capacity)
