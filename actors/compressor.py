"""The segmenter/compressor actor, CPU-only: per stream, which frames form a segment (with
StreamKV's merges), and the segment's entry in the summary index (Redis, or embedded in this
actor). It loads no model (only the checkpoint's shapes, pipeline.model.load_dims): the
compression decisions that run the language model (StreamKV's guidance scoring) are made in the
prefill actor, where the model already is, so a GPU node holds one model copy per role.

Index writes never fail the call that makes them: an IndexWriter journals them and catches the index up when it is
unreachable or comes back empty (cache_store/index_writer.py); `index_health` says how it stands,
on a thread of its own so that it does not wait behind segment work.

Its only state is each stream's open segment (and how far the stream has got); the coordinator
keeps the frames pushed since the last closed segment and replays them into a restarted actor,
and a restarted coordinator reads them back from here (`held`), with the closed segments its
previous process may not have committed (kept until the coordinator says they are).

Torch and transformers are imported where they are used (see actors/prefill.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import ray

from actors.messages import HeldSegments, LoneFrames, SegmenterState, SourceNote
from actors.release import release_freed_memory
from actors.spec import StreamSpec, lookup
from cache_store.index import EmbeddedIndex, RedisIndex, SegmentIndex, SegmentRecord
from cache_store.index_writer import IndexHealth, IndexWriter
from pipeline.errors import UnknownStreamError

if TYPE_CHECKING:
    from cache_store.envelope import Wire
    from pipeline.segmenter import Segmenter


@dataclass
class _Stream:
    spec: StreamSpec
    segmenter: Segmenter
    frames: int = 0  # frames pushed so far
    last_time: float | None = None  # of the last frame pushed
    source: SourceNote | None = None  # the coordinator's note of the stream's source, kept here for a restarted one
    lone: LoneFrames | None = None  # frames pushed that wait for the rest of their unit (counted in `frames`)
    # closed segments not recorded as committed yet, numbered segmenter.closed - len .. - 1: a
    # restarted coordinator commits those its previous process did not
    closed: list[Wire] = field(default_factory=list)


class CompressorWorker:
    CONCURRENCY_GROUPS = {"health": 1}

    def __init__(self, model_dir: str, index_url: str | None = None):
        from pipeline.model import load_dims

        self.dims = load_dims(model_dir)  # shapes only: presets scale with the tokens per frame
        self.index: SegmentIndex = RedisIndex(index_url) if index_url else EmbeddedIndex()
        self.writer = IndexWriter(self.index)
        self.streams: dict[str, _Stream] = {}

    def open(self, spec: StreamSpec, state: SegmenterState | None = None) -> None:
        """Start a stream, or host it again after a restart from `state`: frames pushed and
        segments closed so far, the last frame's time, its source."""
        from pipeline.segmenter import Segmenter

        config = spec.config(self.dims)
        state = state or SegmenterState()
        stream = _Stream(spec, Segmenter(config), state.frames, state.last_time, state.source, lone=state.lone)
        stream.segmenter.closed = state.segments
        self.streams[spec.stream_id] = stream
        if stream.segmenter.closed:  # recorded by this actor's previous process: not in the journal
            self.writer.note_incomplete(spec.stream_id)

    def note_source(self, stream_id: str, source: SourceNote | None) -> None:
        lookup(self.streams, stream_id).source = source

    def push(self, stream_id: str, features: Wire, lone: LoneFrames | None = None) -> list[Wire]:
        """Frames in (units of them, with `lone` frames waiting for the rest of their unit); the
        segments they close out (zero or more)."""
        import torch

        from cache_store.wire import pack_segment, unpack_features

        stream = lookup(self.streams, stream_id)
        closed = []
        for item in unpack_features(features, "cpu", torch.float32):
            closed += stream.segmenter.push(item)
            stream.frames, stream.last_time = item.frames[1], item.times[1]
        stream.lone = lone if lone is not None and lone.times else None
        if stream.lone is not None:
            stream.frames, stream.last_time = lone.first + len(lone.times), lone.times[-1]
        packed = [pack_segment(s) for s in closed]
        stream.closed += packed
        return packed

    def flush(self, stream_id: str) -> Wire | None:
        """Close the open segment (before a question)."""
        from cache_store.wire import pack_segment

        stream = lookup(self.streams, stream_id)
        segment = stream.segmenter.flush()
        if segment is None:
            return None
        stream.closed.append(pack_segment(segment))
        return stream.closed[-1]

    def held(self) -> dict[str, HeldSegments]:
        """Every stream held here, for a restarted coordinator: open's state, the open segment's
        frames as pack_features' meta and tokens (plain values: the coordinator does not import
        the wire formats), and the closed segments not known to be committed (by reference)."""
        from cache_store.wire import pack_features

        held = {}
        for sid, s in self.streams.items():
            features = pack_features(s.segmenter.open.items if s.segmenter.open else [])
            held[sid] = HeldSegments(s.frames, s.last_time, s.segmenter.closed, s.source, s.lone,
                                     open_ranges=features.meta["features"], open_tokens=features.arrays.get("features"),
                                     closed=[ray.put(segment) for segment in s.closed])
        return held

    def record(self, stream_id: str, committed: int, *updates: Wire) -> None:
        """The committed segments' entries in the summary index (each update carries its summary
        vectors: the KV stays in the object store); `committed`: how many segments of the stream
        are committed now (their closed copies kept here are let go)."""
        self.writer.put([segment_record(stream_id, update) for update in updates if update.meta["units"]])
        if (stream := self.streams.get(stream_id)) is not None:  # (a restarted actor records too)
            del stream.closed[: max(0, len(stream.closed) - (stream.segmenter.closed - committed))]

    def segments(self, stream_id: str) -> list[dict]:
        try:
            records = self.writer.segments(stream_id)
        except UnknownStreamError:  # to the index, a stream is known once it has a record
            lookup(self.streams, stream_id)
            records = []
        return [{"segment": r.segment_id, "frames": list(r.frame_range), "times": list(r.time_range),
                 "units": list(r.unit_ids)} for r in records]

    def close(self, stream_id: str) -> int:
        """Forget the stream; returns how many index keys were deleted (0 while the index is
        unreachable: the deletion is queued)."""
        if self.streams.pop(stream_id, None) is not None:
            release_freed_memory()  # its open segment's tokens (actors/release.py)
        return self.writer.delete_stream(stream_id)

    def index_keys(self, stream_id: str) -> int:
        return self.writer.count_keys(stream_id)

    @ray.method(concurrency_group="health")
    def index_health(self, stream_id: str | None = None) -> IndexHealth:
        """The index's health; for a stream, its pending writes and whether it is incomplete."""
        return self.writer.health(stream_id)

    def ping(self) -> int:
        return len(self.streams)

    @ray.method(concurrency_group="health")
    def tables(self) -> dict[str, int]:
        """Sizes of the per-stream state held here, the index writer's journal included (see
        PrefillWorker.tables)."""
        return {"streams": len(self.streams), **{f"index_{k}": v for k, v in self.writer.tables().items()}}


def segment_record(stream_id: str, update: Wire) -> SegmentRecord:
    """The segment's index entry from its update's metadata and summary vectors [layers, Hkv * d]
    (cache_store/wire.py segment_summary)."""
    units = update.meta["units"]  # [uid, kind, frames, times, ...] (cache_store/wire.py _unit_meta)
    return SegmentRecord(
        stream_id=stream_id, segment_id=update.meta["segment"],
        frame_range=(units[0][2][0], units[-1][2][1]), time_range=(units[0][3][0], units[-1][3][1]),
        unit_ids=[u[0] for u in units], summary=np.asarray(update.arrays["summary"], dtype=np.float32), extra={},
    )
