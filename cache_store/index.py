"""Per-stream index of segment summaries: one contract, an in-process and a Redis backend.

Each segment of a stream has a per-layer summary vector [layers, dim]. `search` scores segments
by dot product with a query [layers, dim]: with `layer=None` the score is the sum over layers of
the per-layer dot products (the dot product of the flattened arrays), with `layer=i` it is layer
i's alone. Results are sorted by score, highest first, ties by segment id.

Both backends store a record as the same msgpack value (summary as raw little-endian float32
bytes, never pickle), so they share validation and corruption handling.

Redis layout (`{ns}` the namespace, the stream id in a hash tag so a stream's keys share a
cluster slot and one SCAN pattern matches exactly them):
    {ns}:{<stream>}:seg:<id>   msgpack record
    {ns}:{<stream>}:ids        sorted set of segment ids (score = id)
    {ns}:streams               set of stream ids (stale members dropped by streams())
    {ns}:epoch                 a random token set by the first writer: a Redis that lost its data
                               (restarted empty, flushed) has none or another (see index_writer.py)
Redis 7 has no vector search, so `search` loads the stream's vectors and ranks them in numpy.
"""

import threading
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import msgpack
import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pipeline.errors import ConfigError, InvalidInputError, PageCorruptError, UnknownStreamError


class UnknownSegmentError(UnknownStreamError):
    """A segment id that does not exist in a (known) stream."""


@dataclass(eq=False)
class SegmentRecord:
    stream_id: str
    segment_id: int
    frame_range: tuple[int, int]       # (first, last + 1)
    time_range: tuple[float, float]    # (start, end) seconds
    unit_ids: list[int]                # blocks in the segment
    summary: np.ndarray                # float32 [layers, dim]
    extra: dict = field(default_factory=dict)  # small, msgpack-able

    def __post_init__(self):
        try:
            self.segment_id = int(self.segment_id)
            self.frame_range = tuple(int(x) for x in self.frame_range)
            self.time_range = tuple(float(x) for x in self.time_range)
            self.unit_ids = [int(u) for u in self.unit_ids]
            self.summary = np.ascontiguousarray(self.summary, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"bad segment record: {e}") from e
        if len(self.frame_range) != 2 or len(self.time_range) != 2 or self.summary.ndim != 2:
            raise InvalidInputError("segment record needs 2-tuples for frame_range/time_range "
                                    f"and a [layers, dim] summary, got {self.summary.shape}")
        _check_name(self.stream_id, "stream id")


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not name or "{" in name or "}" in name:
        raise InvalidInputError(f"{what} must be a non-empty str without braces, got {name!r}")


def _encode(rec: SegmentRecord) -> bytes:
    try:
        return msgpack.packb({
            "v": 1, "stream_id": rec.stream_id, "segment_id": rec.segment_id,
            "frame_range": rec.frame_range, "time_range": rec.time_range,
            "unit_ids": rec.unit_ids, "summary_shape": rec.summary.shape,
            "summary": rec.summary.astype("<f4", copy=False).tobytes(), "extra": rec.extra,
        }, use_bin_type=True)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"segment record extra is not msgpack-able: {e}") from e


def _decode(data: bytes, stream_id: str, segment_id: int) -> SegmentRecord:
    """The summary is a zero-copy, read-only view of `data`."""
    where = f"segment {stream_id}/{segment_id}"
    try:
        d = msgpack.unpackb(data, raw=False)
        if d["v"] != 1:
            raise ValueError(f"unknown record version {d['v']!r}")
        shape = tuple(int(n) for n in d["summary_shape"])
        summary = np.frombuffer(d["summary"], "<f4").reshape(shape)
        rec = SegmentRecord(d["stream_id"], d["segment_id"], d["frame_range"], d["time_range"],
                            d["unit_ids"], summary, dict(d["extra"]))
    except Exception as e:  # any malformed value: msgpack, missing key, wrong type or size
        raise PageCorruptError(f"malformed stored {where}: {type(e).__name__}: {e}") from e
    if (rec.stream_id, rec.segment_id) != (stream_id, segment_id):
        raise PageCorruptError(f"stored {where} holds {rec.stream_id}/{rec.segment_id}")
    return rec


def _rank(records: list[SegmentRecord], query: np.ndarray, top_k: int,
          layer: int | None) -> list[tuple[int, float]]:
    if top_k < 1:
        raise InvalidInputError(f"top_k must be >= 1, got {top_k}")
    q = np.asarray(query, dtype=np.float32)
    bad = [r.segment_id for r in records if r.summary.shape != q.shape]
    if q.ndim != 2 or bad:
        raise InvalidInputError(f"query {q.shape} must be [layers, dim] like the summaries "
                                f"(segments {bad[:5]} differ)")
    if layer is not None and not -q.shape[0] <= layer < q.shape[0]:
        raise InvalidInputError(f"layer {layer} out of range for {q.shape[0]} layers")
    if not records:
        return []
    ids = np.array([r.segment_id for r in records])
    per_layer = np.einsum("nld,ld->nl", np.stack([r.summary for r in records]), q)  # [n, layers]
    scores = per_layer.sum(axis=1) if layer is None else per_layer[:, layer]       # [n]
    order = np.lexsort((ids, -scores))[:top_k]
    return [(int(ids[i]), float(scores[i])) for i in order]


class SegmentIndex(ABC):
    """Contract of the segment index. Unknown streams raise UnknownStreamError, unknown
    segments UnknownSegmentError (both KeyError), malformed stored values PageCorruptError."""

    @abstractmethod
    def put(self, record: SegmentRecord) -> None:
        """Insert or replace; a stream with a TTL gives the new record the remaining TTL."""

    def put_batch(self, records: list[SegmentRecord]) -> None:
        """put() each record (a backend may send them at once)."""
        for record in records:
            self.put(record)

    def epoch(self) -> str:
        """A token that changes when the store loses its data (restarted empty, flushed): a
        writer that saw another one must write everything again. In-process: never."""
        return "embedded"

    def present(self, stream_id: str, segment_ids: list[int]) -> set[int]:
        """Which of the segments are stored."""
        try:
            held = {r.segment_id for r in self.segments(stream_id)}
        except UnknownStreamError:
            return set()
        return held & set(segment_ids)

    @abstractmethod
    def get(self, stream_id: str, segment_id: int) -> SegmentRecord: ...

    @abstractmethod
    def segments(self, stream_id: str) -> list[SegmentRecord]:
        """All records of the stream in segment-id order."""

    def search(self, stream_id: str, query: np.ndarray, top_k: int,
               layer: int | None = None) -> list[tuple[int, float]]:
        """[(segment_id, score)] of the top_k segments by dot product (see module doc)."""
        return _rank(self.segments(stream_id), query, top_k, layer)

    @abstractmethod
    def streams(self) -> list[str]:
        """Live stream ids, sorted."""

    @abstractmethod
    def delete_stream(self, stream_id: str) -> int:
        """Remove everything of the stream; returns how many keys/records went (0 if unknown)."""

    @abstractmethod
    def set_ttl(self, stream_id: str, seconds: float) -> None:
        """The whole stream expires `seconds` from now."""

    @abstractmethod
    def count_keys(self, stream_id: str) -> int:
        """Storage units held for the stream: records (embedded) or Redis keys (redis)."""


def _check_ttl(seconds: float) -> None:
    if not seconds > 0:
        raise InvalidInputError(f"TTL must be > 0 seconds, got {seconds}")


class EmbeddedIndex(SegmentIndex):
    """In-process and thread-safe; TTLs run on time.monotonic()."""

    def __init__(self):
        self._lock = threading.Lock()
        self._data: dict[str, dict[int, bytes]] = {}  # stream -> segment id -> encoded record
        self._deadline: dict[str, float] = {}         # stream -> monotonic expiry time

    def _expire(self) -> None:  # call with the lock held
        now = time.monotonic()
        for s in [s for s, t in self._deadline.items() if t <= now]:
            del self._deadline[s], self._data[s]

    def _stream(self, stream_id: str) -> dict[int, bytes]:  # call with the lock held
        self._expire()
        if stream_id not in self._data:
            raise UnknownStreamError(f"unknown stream {stream_id!r}")
        return self._data[stream_id]

    def put(self, record: SegmentRecord) -> None:
        data = _encode(record)
        with self._lock:
            self._expire()
            self._data.setdefault(record.stream_id, {})[record.segment_id] = data

    def get(self, stream_id: str, segment_id: int) -> SegmentRecord:
        with self._lock:
            data = self._stream(stream_id).get(segment_id)
        if data is None:
            raise UnknownSegmentError(f"unknown segment {segment_id} of stream {stream_id!r}")
        return _decode(data, stream_id, segment_id)

    def segments(self, stream_id: str) -> list[SegmentRecord]:
        with self._lock:
            items = sorted(self._stream(stream_id).items())
        return [_decode(data, stream_id, i) for i, data in items]

    def streams(self) -> list[str]:
        with self._lock:
            self._expire()
            return sorted(self._data)

    def delete_stream(self, stream_id: str) -> int:
        with self._lock:
            self._deadline.pop(stream_id, None)
            return len(self._data.pop(stream_id, {}))

    def set_ttl(self, stream_id: str, seconds: float) -> None:
        _check_ttl(seconds)
        with self._lock:
            self._stream(stream_id)
            self._deadline[stream_id] = time.monotonic() + seconds

    def count_keys(self, stream_id: str) -> int:
        with self._lock:
            self._expire()
            return len(self._data.get(stream_id, {}))


def _glob_escape(s: str) -> str:
    return "".join("\\" + c if c in "\\*?[]^" else c for c in s)


class RedisIndex(SegmentIndex):
    """Segment index in Redis (see module doc for the key layout). Writes are pipelined, data
    before the metadata that points at it; ids whose record is gone (evicted, expired) are
    skipped by segments()/search(). Under concurrent put and set_ttl on one stream a new record
    may miss the TTL (put reads the stream's remaining TTL, then writes)."""

    def __init__(self, client: redis.Redis | str, namespace: str = "streamkv"):
        # from a URL: calls to an unreachable server fail within seconds (redis-py's default is 5 s
        # per attempt, 3 retries), and the caller (IndexWriter) retries instead
        self.r = redis.Redis.from_url(client, socket_connect_timeout=1.0, socket_timeout=2.0,
                                      retry=Retry(NoBackoff(), 1)) if isinstance(client, str) else client
        if self.r.connection_pool.connection_kwargs.get("decode_responses"):
            raise ConfigError("RedisIndex needs a client with decode_responses=False (msgpack)")
        _check_name(namespace, "namespace")
        self.ns = namespace
        self._streams_key = f"{namespace}:streams"
        self._epoch_key = f"{namespace}:epoch"

    def _prefix(self, stream_id: str) -> str:
        _check_name(stream_id, "stream id")
        return f"{self.ns}:{{{stream_id}}}:"

    def _keys(self, stream_id: str) -> list[bytes]:
        match = _glob_escape(self._prefix(stream_id)) + "*"
        return list(self.r.scan_iter(match=match, count=1000))

    def put(self, record: SegmentRecord) -> None:
        self.put_batch([record])

    def put_batch(self, records: list[SegmentRecord]) -> None:
        """Two round trips: the streams' remaining TTLs, then every write."""
        data = [_encode(r) for r in records]
        streams = sorted({r.stream_id for r in records})
        pipe = self.r.pipeline(transaction=False)
        for s in streams:
            pipe.pttl(self._prefix(s) + "ids")  # -2 absent, -1 no TTL
        ttl_ms = dict(zip(streams, pipe.execute()))
        for record, value in zip(records, data):
            p, i, ttl = self._prefix(record.stream_id), record.segment_id, ttl_ms[record.stream_id]
            pipe.set(f"{p}seg:{i}", value, px=ttl if ttl > 0 else None)
            pipe.zadd(p + "ids", {str(i): i})
        if streams:
            pipe.sadd(self._streams_key, *streams)
        pipe.execute()

    def epoch(self) -> str:
        token = self.r.get(self._epoch_key)
        if token is None:  # a new (or emptied) server: the first writer to ask sets it
            self.r.set(self._epoch_key, uuid.uuid4().hex, nx=True)
            token = self.r.get(self._epoch_key)
        return token.decode() if token is not None else ""

    def present(self, stream_id: str, segment_ids: list[int]) -> set[int]:
        p = self._prefix(stream_id)
        pipe = self.r.pipeline(transaction=False)
        for i in segment_ids:  # the record and its id (one may outlive the other: an AOF cut short)
            pipe.exists(f"{p}seg:{i}")
            pipe.zscore(p + "ids", str(i))
        found = pipe.execute()
        return {i for i, n, score in zip(segment_ids, found[::2], found[1::2]) if n and score is not None}

    def get(self, stream_id: str, segment_id: int) -> SegmentRecord:
        p = self._prefix(stream_id)
        pipe = self.r.pipeline(transaction=False)
        pipe.exists(p + "ids")
        pipe.get(f"{p}seg:{segment_id}")
        known, data = pipe.execute()
        if data is None:
            if not known:
                raise UnknownStreamError(f"unknown stream {stream_id!r}")
            raise UnknownSegmentError(f"unknown segment {segment_id} of stream {stream_id!r}")
        return _decode(data, stream_id, segment_id)

    def segments(self, stream_id: str) -> list[SegmentRecord]:
        p = self._prefix(stream_id)
        ids = [int(i) for i in self.r.zrange(p + "ids", 0, -1)]
        if not ids:  # Redis drops empty sorted sets: no ids key means no stream
            raise UnknownStreamError(f"unknown stream {stream_id!r}")
        values = self.r.mget([f"{p}seg:{i}" for i in ids])
        return [_decode(v, stream_id, i) for i, v in zip(ids, values) if v is not None]

    def streams(self) -> list[str]:
        names = sorted(s.decode() for s in self.r.smembers(self._streams_key))
        pipe = self.r.pipeline(transaction=False)
        for s in names:
            pipe.exists(self._prefix(s) + "ids")
        live = pipe.execute()
        stale = [s for s, ok in zip(names, live) if not ok]
        if stale:
            self.r.srem(self._streams_key, *stale)
        return [s for s, ok in zip(names, live) if ok]

    def delete_stream(self, stream_id: str) -> int:
        keys = self._keys(stream_id)
        pipe = self.r.pipeline(transaction=False)
        for k in keys:
            pipe.unlink(k)
        pipe.srem(self._streams_key, stream_id)
        return sum(pipe.execute()[:-1])

    def set_ttl(self, stream_id: str, seconds: float) -> None:
        _check_ttl(seconds)
        keys = self._keys(stream_id)
        if not keys:
            raise UnknownStreamError(f"unknown stream {stream_id!r}")
        ms = max(1, round(seconds * 1000))
        pipe = self.r.pipeline(transaction=False)
        for k in keys:
            pipe.pexpire(k, ms)
        pipe.execute()

    def count_keys(self, stream_id: str) -> int:
        return len(self._keys(stream_id))
