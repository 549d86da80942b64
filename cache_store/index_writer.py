"""Writes to the segment index that never fail their caller: queued, retried, caught up.

The index (Redis) may be unreachable, or come back restarted, with its data (AOF/RDB) or empty.
Ingest and answers do not wait for it: `put` and `delete_stream` return at once, and what could
not be written waits here and is written by a background thread, retried with exponential
backoff (`backoff_s` doubling to `backoff_max_s`): a Redis back is caught up within a second.

The journal. Every record put for a live stream is kept here (the summary vectors: [layers, dim]
float32, ~57 KB a segment for a 7B model) until the stream is deleted, so that what Redis lost
can be written again:
- records put while Redis was unreachable are written once it answers;
- after an outage, every journaled record missing from Redis is written again (a server back on
  an RDB snapshot lacks what came after it; on an AOF fsynced every second, after a machine
  crash, its last second);
- a Redis that lost everything (restarted empty without persistence, flushed) is told by its
  epoch key (`SegmentIndex.epoch`, checked before each write and every `check_s` while idle):
  then every journaled record is written again.
The journal is bounded (`journal_bytes`). Past the bound the oldest records already written are
let go first (Redis holds them; should it lose them too they are counted `records_unrecoverable`),
then, when everything held is still unwritten, the oldest unwritten records are dropped and
counted `records_dropped`: they never reach the index. A stream missing records in the journal
(let go, dropped, or journaled only since this process started) is "incomplete".

Reads: `segments` comes from the index while it is healthy, else from the journal when the
journal holds the whole stream, else IndexUnavailableError. `count_keys` needs the index.
Deletes of streams while the index is unreachable are queued too, and run before the writes.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum

from cache_store.index import SegmentIndex, SegmentRecord
from pipeline.errors import IndexUnavailableError, UnknownStreamError


class IndexState(str, Enum):
    HEALTHY = "healthy"    # reachable, every record written
    DEGRADED = "degraded"  # unreachable, or writes waiting to be caught up


@dataclass(frozen=True)
class WriterConfig:
    journal_bytes: int = 256 * 2**20  # records held for rewriting (see the module doc)
    backoff_s: float = 0.05  # first retry after a failure, doubling
    backoff_max_s: float = 1.0
    check_s: float = 1.0  # epoch check while healthy and idle


@dataclass(frozen=True)
class IndexHealth:
    """The index as the writer sees it (for one stream: pending_writes and incomplete are its)."""
    state: IndexState
    pending_writes: int  # records waiting to be written (again)
    pending_deletes: int  # streams waiting to be deleted from the index
    last_error: str | None  # the last failed call's error
    last_error_at: float | None  # unix time of it
    outages: int  # times the index went from healthy to degraded
    resets: int  # times it was found to have lost everything (epoch changed)
    records_rewritten: int  # written by catch-ups (queued during an outage, or lost by Redis)
    records_dropped: int  # unwritten records dropped past the journal bound: never written
    records_unrecoverable: int  # lost by Redis after the journal had let them go
    last_catch_up_s: float | None  # the last outage: first failure to everything written
    journal_records: int
    journal_bytes: int
    incomplete: bool = False  # (per stream) the journal does not hold every record of it


@dataclass
class _Held:
    record: SegmentRecord
    nbytes: int
    written: bool = False


@dataclass
class _Counters:
    outages: int = 0
    resets: int = 0
    rewritten: int = 0
    dropped: int = 0
    unrecoverable: int = 0


def _size(record: SegmentRecord) -> int:
    return record.summary.nbytes + 8 * len(record.unit_ids) + 128  # + the rest, roughly


class IndexWriter:
    def __init__(self, index: SegmentIndex, config: WriterConfig | None = None):
        self.index, self.config = index, config or WriterConfig()
        self._lock = threading.Lock()  # the state below
        self._io = threading.Lock()  # one call to the index at a time
        self._held: OrderedDict[tuple[str, int], _Held] = OrderedDict()  # oldest first
        self._pending: dict[tuple[str, int], SegmentRecord] = {}  # unwritten, oldest first
        self._deletes: set[str] = set()
        self._incomplete: dict[str, int] = {}  # stream the journal lacks records of -> written ones let go
        self._bytes = 0
        self._epoch: str | None = None
        self._audit = False  # after an outage: check that Redis holds every written record
        self.state = IndexState.HEALTHY
        self._error: tuple[str, float] | None = None
        self._outage_start: float | None = None
        self._catch_up_s: float | None = None
        self._n = _Counters()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="index-writer", daemon=True)
        self._thread.start()

    # ---- the caller's side ------------------------------------------------------------------
    def put(self, records: list[SegmentRecord]) -> None:
        """Journal the records and write them now if the index is healthy; never raises for the
        index's faults."""
        with self._lock:
            for r in records:
                key = (r.stream_id, r.segment_id)
                if (old := self._held.pop(key, None)) is not None:
                    self._bytes -= old.nbytes
                self._held[key] = _Held(r, _size(r))
                self._bytes += self._held[key].nbytes
                self._pending.pop(key, None)
                self._pending[key] = r
            self._bound()
        self._now_or_later()

    def delete_stream(self, stream_id: str) -> int:
        """Forget the stream here and in the index; the keys deleted now (0 when queued)."""
        with self._lock:
            for key in [k for k in self._held if k[0] == stream_id]:
                self._bytes -= self._held.pop(key).nbytes
                self._pending.pop(key, None)
            self._incomplete.pop(stream_id, None)
        if self.state is IndexState.HEALTHY:
            with self._io:
                try:
                    return self.index.delete_stream(stream_id)
                except Exception as error:  # noqa: BLE001 - any failure of the index is retried
                    self._failed(error)
        with self._lock:
            self._deletes.add(stream_id)
        return 0

    def note_incomplete(self, stream_id: str) -> None:
        """The stream has records this journal never held (written by a previous process)."""
        with self._lock:
            self._incomplete.setdefault(stream_id, 0)

    def segments(self, stream_id: str) -> list[SegmentRecord]:
        if self.state is IndexState.HEALTHY:
            try:
                with self._io:
                    return self.index.segments(stream_id)
            except UnknownStreamError:
                raise
            except Exception as error:  # noqa: BLE001
                self._failed(error)
        with self._lock:
            if stream_id in self._incomplete:
                raise IndexUnavailableError(
                    f"the segment index is unreachable ({self._error and self._error[0]}) and this process "
                    f"does not hold every segment of stream {stream_id!r}")
            records = sorted((h.record for k, h in self._held.items() if k[0] == stream_id),
                             key=lambda r: r.segment_id)
        if not records:
            raise UnknownStreamError(f"unknown stream {stream_id!r}")
        return records

    def count_keys(self, stream_id: str) -> int:
        try:
            with self._io:
                return self.index.count_keys(stream_id)
        except Exception as error:  # noqa: BLE001
            self._failed(error)
            raise IndexUnavailableError(f"the segment index is unreachable: {self._error[0]}") from error

    def health(self, stream_id: str | None = None) -> IndexHealth:
        with self._lock:
            pending = [k for k in self._pending if stream_id is None or k[0] == stream_id]
            error, at = self._error or (None, None)
            return IndexHealth(
                self.state, len(pending), len(self._deletes), error, at, self._n.outages, self._n.resets,
                self._n.rewritten, self._n.dropped, self._n.unrecoverable, self._catch_up_s, len(self._held),
                self._bytes, incomplete=bool(stream_id in self._incomplete if stream_id else self._incomplete))

    def tables(self) -> dict[str, int]:
        """Sizes of its per-stream tables: records journaled and pending, deletes queued, streams
        marked incomplete (all 0 once every stream is deleted and Redis has answered)."""
        with self._lock:
            return {"held": len(self._held), "pending": len(self._pending), "deletes": len(self._deletes),
                    "incomplete": len(self._incomplete), "bytes": self._bytes}

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    # ---- writing ------------------------------------------------------------------------------
    def _bound(self) -> None:
        """Keep the journal under journal_bytes (call with the lock held; see the module doc)."""
        for written_only in (True, False):
            for key in [k for k, h in self._held.items() if h.written or not written_only]:
                if self._bytes <= self.config.journal_bytes:
                    return
                held = self._held.pop(key)
                self._bytes -= held.nbytes
                dropped = self._pending.pop(key, None) is not None
                self._n.dropped += dropped
                # written ones let go: unrecoverable should Redis lose them
                self._incomplete[key[0]] = self._incomplete.get(key[0], 0) + (not dropped)

    def _now_or_later(self) -> None:
        if self.state is IndexState.HEALTHY:
            with self._io:
                self._attempt()

    def _run(self) -> None:
        delay = self.config.backoff_s
        while not self._stop.is_set():
            degraded = self.state is IndexState.DEGRADED
            self._wake.wait(delay if degraded else self.config.check_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            with self._io:
                ok = self._attempt()
            if not ok:  # (its own failure woke it: wait the backoff out)
                self._wake.clear()
            delay = self.config.backoff_s if ok else min(2 * delay, self.config.backoff_max_s)
            if ok and self.state is IndexState.DEGRADED:  # more came meanwhile: go on at once
                self._wake.set()

    def _attempt(self) -> bool:
        """Check the epoch, run queued deletes, write what is pending (call with _io held).
        Records written while degraded or after a reset count as rewritten."""
        catching_up = self.state is IndexState.DEGRADED
        try:
            catching_up |= self._sync_epoch()
            for stream_id in sorted(self._deletes):
                self.index.delete_stream(stream_id)
                with self._lock:
                    self._deletes.discard(stream_id)
            with self._lock:
                batch = list(self._pending.items())
            if batch:
                self.index.put_batch([r for _, r in batch])
        except Exception as error:  # noqa: BLE001 - whatever the index answered, retry later
            self._failed(error)
            return False
        with self._lock:
            for key, record in batch:
                if self._pending.get(key) is record:  # not replaced meanwhile
                    del self._pending[key]
                    self._held[key].written = True
            self._n.rewritten += len(batch) if catching_up else 0
            if not self._pending and not self._deletes and self.state is IndexState.DEGRADED:
                self.state = IndexState.HEALTHY
                self._catch_up_s = time.monotonic() - self._outage_start
        return True

    def _sync_epoch(self) -> bool:
        """A new epoch: Redis lost everything, write every journaled record again (True). After
        an outage: write again what Redis should hold and does not."""
        epoch = self.index.epoch()
        with self._lock:
            lost = self._epoch is not None and epoch != self._epoch
            if lost:
                self._n.resets += 1
                self._n.unrecoverable += sum(self._incomplete.values())
                self._incomplete = dict.fromkeys(self._incomplete, 0)  # counted: lost now
                for key, held in self._held.items():
                    if key not in self._pending:
                        self._pending[key] = held.record
                        held.written = False
            self._epoch = epoch
            audit, self._audit = self._audit and not lost, False
            written = {}
            for (sid, seg), held in self._held.items():
                if audit and held.written:
                    written.setdefault(sid, []).append(seg)
        for sid, ids in written.items():
            missing = set(ids) - self.index.present(sid, ids)
            with self._lock:
                for seg in missing:
                    if (held := self._held.get((sid, seg))) is not None and (sid, seg) not in self._pending:
                        self._pending[(sid, seg)] = held.record
                        held.written = False
        return lost

    def _failed(self, error: Exception) -> None:
        with self._lock:
            self._error = (f"{type(error).__name__}: {error}", time.time())
            self._audit = True
            if self.state is IndexState.HEALTHY:
                self.state = IndexState.DEGRADED
                self._n.outages += 1
                self._outage_start = time.monotonic()
        self._wake.set()
