"""Contract tests of the segment index, run against both backends (Redis: a real private
redis-server from tests/plugins/redis_server.py)."""

import threading
import time

import msgpack
import numpy as np
import pytest

from cache_store import EmbeddedIndex, RedisIndex, SegmentRecord, UnknownSegmentError
from pipeline.errors import ConfigError, InvalidInputError, PageCorruptError, UnknownStreamError

LAYERS, DIM = 3, 8


@pytest.fixture(params=["embedded", "redis"])
def index(request):
    if request.param == "embedded":
        return EmbeddedIndex()
    return RedisIndex(request.getfixturevalue("redis_client"))


def rec(stream: str, seg: int, seed: int | None = None, scale: float = 1.0) -> SegmentRecord:
    # Integer-valued summaries: float32 dot products are exact, so rankings are deterministic.
    rng = np.random.default_rng(seg if seed is None else seed)
    summary = rng.integers(-5, 6, size=(LAYERS, DIM)).astype(np.float32) * scale
    return SegmentRecord(stream, seg, (seg * 8, seg * 8 + 8), (seg * 4.0, seg * 4.0 + 4.0),
                         [seg * 2, seg * 2 + 1], summary, {"caption": f"segment {seg}"})


def assert_same(a: SegmentRecord, b: SegmentRecord) -> None:
    assert (a.stream_id, a.segment_id, a.frame_range, a.time_range, a.unit_ids, a.extra) == \
        (b.stream_id, b.segment_id, b.frame_range, b.time_range, b.unit_ids, b.extra)
    assert a.summary.dtype == np.float32 and np.array_equal(a.summary, b.summary)


def corrupt(index, stream: str, seg: int, data: bytes) -> None:
    """Overwrite one stored value behind the index's back."""
    if isinstance(index, EmbeddedIndex):
        index._data[stream][seg] = data
    else:
        index.r.set(f"{index.ns}:{{{stream}}}:seg:{seg}", data)


def test_put_get_segments_in_order(index):
    records = {i: rec("cam", i) for i in (5, 1, 3, 12)}
    for r in records.values():
        index.put(r)
    for i, r in records.items():
        assert_same(index.get("cam", i), r)
    assert [r.segment_id for r in index.segments("cam")] == [1, 3, 5, 12]
    index.put(rec("cam", 3, seed=99))  # replace
    assert_same(index.get("cam", 3), rec("cam", 3, seed=99))
    assert len(index.segments("cam")) == 4
    assert index.streams() == ["cam"]


@pytest.mark.parametrize("layer", [None, 0, 2, -1])
def test_search_equals_numpy(index, layer):
    records = [rec("cam", i) for i in range(12)]
    for r in records:
        index.put(r)
    query = np.random.default_rng(7).integers(-3, 4, size=(LAYERS, DIM)).astype(np.float32)
    expected = []
    for r in records:
        s = r.summary.ravel() @ query.ravel() if layer is None else r.summary[layer] @ query[layer]
        expected.append((r.segment_id, float(s)))
    expected.sort(key=lambda x: (-x[1], x[0]))
    assert index.search("cam", query, top_k=5, layer=layer) == expected[:5]
    assert index.search("cam", query, top_k=100, layer=layer) == expected


def test_search_is_isolated_between_streams(index):
    for i in range(5):
        index.put(rec("a", i))
        index.put(rec("b", 100 + i, scale=1000.0))  # would win every search if visible
        index.put(rec("b", i, seed=50 + i, scale=1000.0))  # same ids as stream a
    q = np.ones((LAYERS, DIM), np.float32)
    hits = index.search("a", q, top_k=10)
    assert sorted(i for i, _ in hits) == list(range(5))
    assert all(abs(s) < 1000 for _, s in hits)
    assert all(r.stream_id == "a" for r in index.segments("a"))
    assert_same(index.get("a", 0), rec("a", 0))
    assert index.streams() == ["a", "b"]


def test_search_validates_query(index):
    index.put(rec("cam", 0))
    with pytest.raises(InvalidInputError):
        index.search("cam", np.ones((LAYERS, DIM + 1)), top_k=1)
    with pytest.raises(InvalidInputError):
        index.search("cam", np.ones(DIM), top_k=1)
    with pytest.raises(InvalidInputError):
        index.search("cam", np.ones((LAYERS, DIM)), top_k=0)
    with pytest.raises(InvalidInputError):
        index.search("cam", np.ones((LAYERS, DIM)), top_k=1, layer=LAYERS)


def test_ttl_expires_the_whole_stream(index):
    index.put(rec("short", 0))
    index.put(rec("long", 0))
    index.set_ttl("short", 0.3)
    index.put(rec("short", 1))  # a record put later inherits the stream's TTL
    assert [r.segment_id for r in index.segments("short")] == [0, 1]
    time.sleep(0.45)
    assert index.streams() == ["long"]
    assert index.count_keys("short") == 0
    with pytest.raises(UnknownStreamError):
        index.get("short", 1)
    with pytest.raises(UnknownStreamError):
        index.segments("short")
    assert_same(index.get("long", 0), rec("long", 0))


def test_delete_stream_frees_everything(index):
    for i in range(6):
        index.put(rec("gone", i))
        index.put(rec("kept", i))
    n = index.count_keys("gone")
    assert n >= 6
    assert index.delete_stream("gone") == n
    assert index.count_keys("gone") == 0
    assert index.streams() == ["kept"]
    with pytest.raises(UnknownStreamError):
        index.get("gone", 0)
    assert index.delete_stream("gone") == 0
    assert len(index.segments("kept")) == 6
    if isinstance(index, RedisIndex):  # nothing of the stream is left anywhere in Redis
        assert not [k for k in index.r.scan_iter(count=1000) if b"gone" in k]
        assert index.r.smembers(f"{index.ns}:streams") == {b"kept"}


def test_glob_characters_in_stream_ids(index):
    for s in ("cam*", "cam1", "cam[1]", "cam?", "cam:1", "a\\b"):
        index.put(rec(s, 0))
    assert index.delete_stream("cam*") == index.delete_stream("cam?") == (
        1 if isinstance(index, EmbeddedIndex) else 2)
    assert index.streams() == sorted(["cam1", "cam[1]", "cam:1", "a\\b"])
    assert all(index.count_keys(s) > 0 for s in index.streams())


def test_unknown_stream_and_segment_are_typed(index):
    with pytest.raises(UnknownStreamError):
        index.get("nope", 0)
    with pytest.raises(UnknownStreamError):
        index.segments("nope")
    with pytest.raises(UnknownStreamError):
        index.search("nope", np.ones((LAYERS, DIM)), top_k=1)
    with pytest.raises(UnknownStreamError):
        index.set_ttl("nope", 1.0)
    index.put(rec("cam", 0))
    with pytest.raises(UnknownSegmentError) as e:
        index.get("cam", 1)
    assert isinstance(e.value, KeyError) and isinstance(e.value, UnknownStreamError)
    assert index.count_keys("nope") == 0


def test_invalid_records(index):
    with pytest.raises(InvalidInputError):
        index.put(SegmentRecord("cam", 0, (0, 1), (0, 1), [0], np.ones(DIM)))  # 1-D summary
    with pytest.raises(InvalidInputError):
        index.put(SegmentRecord("c{a}m", 0, (0, 1), (0, 1), [0], np.ones((1, DIM))))
    with pytest.raises(InvalidInputError):
        index.put(SegmentRecord("cam", 0, (0, 1), (0, 1), [0], np.ones((1, DIM)),
                                {"bad": object()}))
    with pytest.raises(InvalidInputError):
        index.set_ttl("cam", 0)


@pytest.mark.parametrize("data", [
    b"\xc1garbage",                                        # not msgpack
    msgpack.packb([1, 2, 3]),                              # not a record
    msgpack.packb({"v": 1, "stream_id": "cam", "segment_id": 0, "frame_range": [0, 8],
                   "time_range": [0, 4], "unit_ids": [0], "summary_shape": [LAYERS, DIM],
                   "summary": b"\0" * 12, "extra": {}}),   # summary bytes too short
    msgpack.packb({"v": 1, "stream_id": "other", "segment_id": 0, "frame_range": [0, 8],
                   "time_range": [0, 4], "unit_ids": [0], "summary_shape": [1, 1],
                   "summary": b"\0" * 4, "extra": {}}),    # another stream's record
])
def test_malformed_stored_value_is_typed(index, data):
    index.put(rec("cam", 0))
    index.put(rec("cam", 1))
    corrupt(index, "cam", 0, data)
    with pytest.raises(PageCorruptError, match="cam/0"):
        index.get("cam", 0)
    with pytest.raises(PageCorruptError):
        index.segments("cam")
    assert_same(index.get("cam", 1), rec("cam", 1))


def test_concurrent_puts(index):
    def work(t):
        for i in range(20):
            index.put(rec(f"s{t}", i))
    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert index.streams() == ["s0", "s1", "s2", "s3"]
    assert all(len(index.segments(f"s{t}")) == 20 for t in range(4))


def test_redis_index_survives_restart(redis_server, redis_client):
    index = RedisIndex(redis_client)
    for i in range(4):
        index.put(rec("cam", i))
    q = np.ones((LAYERS, DIM), np.float32)
    before = index.search("cam", q, top_k=3)
    redis_server.restart()  # SIGTERM, then start again on the append-only file
    index = RedisIndex(redis_server.url)
    assert index.streams() == ["cam"]
    for i in range(4):
        assert_same(index.get("cam", i), rec("cam", i))
    assert index.search("cam", q, top_k=3) == before


def test_redis_namespaces_are_isolated(redis_client):
    a, b = RedisIndex(redis_client, "ns1"), RedisIndex(redis_client, "ns2")
    a.put(rec("cam", 0))
    assert b.streams() == [] and a.streams() == ["cam"]
    with pytest.raises(UnknownStreamError):
        b.get("cam", 0)
    assert b.delete_stream("cam") == 0 and a.count_keys("cam") == 2


def test_redis_index_rejects_decoding_client(redis_server):
    with pytest.raises(ConfigError):
        RedisIndex(redis_server.client(decode_responses=True))


def test_redis_layout_and_ttl_on_every_key(redis_client):
    index = RedisIndex(redis_client)
    index.put(rec("cam", 0))
    index.put(rec("cam", 1))
    keys = sorted(redis_client.scan_iter(match="streamkv:*"))
    assert keys == [b"streamkv:streams", b"streamkv:{cam}:ids", b"streamkv:{cam}:seg:0",
                    b"streamkv:{cam}:seg:1"]
    assert redis_client.type("streamkv:{cam}:ids") == b"zset"
    index.set_ttl("cam", 60)
    index.put(rec("cam", 2))
    for k in redis_client.scan_iter(match="streamkv:{cam}:*"):
        assert 0 < redis_client.pttl(k) <= 60_000
