"""The index writer against real redis-servers that are unreachable, killed and restarted (with an
AOF, an RDB snapshot, or nothing): puts never fail, and once Redis answers it holds every record,
including those it lost."""

import time

import numpy as np
import pytest

from tests.test_cache_store_index import assert_same, rec

from cache_store.index import RedisIndex
from cache_store.index_writer import IndexState, IndexWriter, WriterConfig
from pipeline.errors import IndexUnavailableError, UnknownStreamError

FAST = WriterConfig(backoff_s=0.02, backoff_max_s=0.2, check_s=0.1)


@pytest.fixture
def writers():
    made = []

    def make(url: str, config: WriterConfig = FAST) -> IndexWriter:
        made.append(IndexWriter(RedisIndex(url), config))
        return made[-1]

    yield make
    for writer in made:
        writer.close()


def caught_up(writer: IndexWriter, timeout_s: float = 60.0):
    """Wait (a bounded wait, not a timing assertion) until everything is written."""
    deadline = time.monotonic() + timeout_s
    while True:
        health = writer.health()
        if health.state is IndexState.HEALTHY and not health.pending_writes and not health.pending_deletes:
            return health
        assert time.monotonic() < deadline, health
        time.sleep(0.02)


def assert_holds(url: str, records: list) -> None:
    """A fresh client on the server holds exactly these records, per stream."""
    index = RedisIndex(url)
    for sid in {r.stream_id for r in records}:
        expected = sorted((r for r in records if r.stream_id == sid), key=lambda r: r.segment_id)
        stored = index.segments(sid)
        assert [r.segment_id for r in stored] == [r.segment_id for r in expected]
        for a, b in zip(stored, expected):
            assert_same(a, b)
    assert index.streams() == sorted({r.stream_id for r in records})


def test_unreachable_from_the_start(private_redis, writers):
    server = private_redis("none", started=False)
    writer = writers(server.url)
    records = [rec("cam", i) for i in range(5)]
    for r in records:
        writer.put([r])  # never raises
    health = writer.health()
    assert health.state is IndexState.DEGRADED and health.pending_writes == 5
    assert "ConnectionError" in health.last_error and health.outages == 1
    # what the index cannot answer, the journal does
    assert [r.segment_id for r in writer.segments("cam")] == list(range(5))
    with pytest.raises(IndexUnavailableError):
        writer.count_keys("cam")
    with pytest.raises(UnknownStreamError):
        writer.segments("other")
    server.start(server.port)
    health = caught_up(writer)
    assert health.records_rewritten == 5 and health.last_catch_up_s > 0 and health.resets == 0
    assert_holds(server.url, records)
    assert writer.count_keys("cam") == 5 + 1


@pytest.mark.parametrize("persistence", ["aof", "rdb", "none"])
def test_killed_mid_writes_and_restarted(private_redis, writers, persistence):
    """SIGKILL while records are being written, then a restart with the server's persistence
    (an RDB snapshot lacks what came after it; none: empty): every record is back."""
    server = private_redis(persistence)
    writer = writers(server.url)
    records = [rec(f"s{i % 2}", i) for i in range(20)]
    for r in records[:8]:
        writer.put([r])
    assert writer.health().state is IndexState.HEALTHY
    server.kill()
    for r in records[8:14]:
        writer.put([r])
    assert writer.health().state is IndexState.DEGRADED
    server.start(server.port)
    for r in records[14:]:  # some may be written before the writer notices the server is back
        writer.put([r])
    health = caught_up(writer)
    assert_holds(server.url, records)
    assert health.outages == 1 and health.records_dropped == 0 and health.records_unrecoverable == 0
    if persistence == "none":
        assert health.resets == 1 and health.records_rewritten >= 14  # those lost included
    else:
        assert health.records_rewritten >= 6


def test_restarted_empty_while_idle_is_noticed(private_redis, writers):
    """No write fails: the server restarts empty between two writes. Its epoch tells."""
    server = private_redis("none")
    writer = writers(server.url)
    records = [rec("cam", i) for i in range(4)]
    writer.put(records)
    server.restart()  # SIGTERM and start: no data file, so empty
    deadline = time.monotonic() + 60
    while writer.health().resets < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    caught_up(writer)
    assert_holds(server.url, records)


def test_replaced_records_and_deletes_queued_while_down(private_redis, writers):
    server = private_redis("aof")
    writer = writers(server.url)
    writer.put([rec("gone", 0), rec("kept", 0), rec("kept", 1)])
    server.kill()
    assert writer.delete_stream("gone") == 0  # queued
    writer.put([rec("kept", 1, seed=9)])  # a replacement waits like any write
    health = writer.health()
    assert health.pending_deletes == 1 and health.pending_writes == 1
    server.start(server.port)
    caught_up(writer)
    assert_holds(server.url, [rec("kept", 0), rec("kept", 1, seed=9)])
    assert not [k for k in server.client().scan_iter() if b"gone" in k]


def test_journal_bound(private_redis, writers):
    """Past journal_bytes: written records are let go first (unrecoverable if Redis then loses
    them), then the oldest unwritten ones are dropped (never written); both are counted."""
    server = private_redis("none")
    size = 3 * 8 * 4 + 8 * 2 + 128  # one test record's journal size (_size)
    writer = writers(server.url, WriterConfig(journal_bytes=4 * size, backoff_s=0.02, backoff_max_s=0.2,
                                              check_s=0.1))
    writer.put([rec("cam", i) for i in range(3)])  # written
    server.kill()
    writer.put([rec("cam", i) for i in range(3, 9)])  # 6 unwritten: 3 written let go, then 2 dropped
    health = writer.health()
    assert (health.journal_records, health.records_dropped, health.incomplete) == (4, 2, True)
    with pytest.raises(IndexUnavailableError):  # the journal no longer holds the whole stream
        writer.segments("cam")
    server.start(server.port)  # empty
    health = caught_up(writer)
    assert (health.resets, health.records_unrecoverable) == (1, 3)
    assert [r.segment_id for r in RedisIndex(server.url).segments("cam")] == [5, 6, 7, 8]


def test_a_new_epoch_is_set_once(private_redis):
    server = private_redis("none")
    a, b = RedisIndex(server.url), RedisIndex(server.url)
    assert a.epoch() == b.epoch() != ""
    before = a.epoch()
    server.client().flushall()
    assert b.epoch() != before and a.epoch() == b.epoch()


def test_search_is_unchanged_after_catch_up(private_redis, writers):
    server = private_redis("none", started=False)
    writer = writers(server.url)
    records = [rec("cam", i) for i in range(6)]
    writer.put(records)
    server.start(server.port)
    caught_up(writer)
    q = np.ones_like(records[0].summary)
    expected = sorted(((r.segment_id, float(r.summary.ravel() @ q.ravel())) for r in records),
                      key=lambda x: (-x[1], x[0]))
    assert RedisIndex(server.url).search("cam", q, top_k=6) == expected


def test_after_an_outage_what_redis_lacks_is_written_again(private_redis, writers):
    """A server back with its data file but without its last writes (an RDB snapshot older than
    they are, an AOF after a machine crash): the records it lacks, though written before the
    outage, are written again. Here the lost writes are made deterministic by deleting them
    behind the writer's back first."""
    server = private_redis("aof")
    writer = writers(server.url)
    records = [rec("cam", i) for i in range(4)]
    writer.put(records)
    server.client().delete("streamkv:{cam}:seg:1", "streamkv:{cam}:seg:2")
    server.stop()  # SIGTERM: the AOF keeps the deletion
    writer.put([rec("cam", 4)])
    server.start(server.port)
    health = caught_up(writer)
    assert health.resets == 0 and health.records_rewritten == 3  # 1 and 2 again, and 4
    assert_holds(server.url, records + [rec("cam", 4)])


class _Counting(RedisIndex):
    calls = 0

    def epoch(self) -> str:
        type(self).calls += 1
        return super().epoch()


def test_retries_back_off(private_redis):
    """While Redis is down the writer retries with backoff (0.02 s doubling to 0.2 s here), not
    in a loop: an upper bound on attempts, which a slower machine only lowers."""
    server = private_redis("none", started=False)
    writer = IndexWriter(_Counting(server.url), FAST)
    try:
        writer.put([rec("cam", 0)])
        start = time.monotonic()
        time.sleep(1.0)
        elapsed = time.monotonic() - start
        assert writer.health().state is IndexState.DEGRADED
        assert _Counting.calls <= 2 + 4 + elapsed / 0.2 + 1  # the first, the doublings, then one per 0.2 s
    finally:
        writer.close()


def test_a_stream_recorded_by_a_previous_process_needs_redis(private_redis, writers):
    """A restarted compressor journals a stream only from then on: while Redis is down its
    segment list is refused (not served short), and once Redis is back it is whole again."""
    server = private_redis("aof")
    first = writers(server.url)
    first.put([rec("cam", i) for i in range(3)])
    first.close()  # the process that wrote them is gone
    writer = writers(server.url)
    writer.note_incomplete("cam")
    server.stop()
    writer.put([rec("cam", 3)])
    assert writer.health("cam").incomplete and writer.health("cam").pending_writes == 1
    with pytest.raises(IndexUnavailableError, match="does not hold every segment"):
        writer.segments("cam")
    server.start(server.port)
    caught_up(writer)
    assert [r.segment_id for r in writer.segments("cam")] == [0, 1, 2, 3]
