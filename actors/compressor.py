"""The segmenter/compressor actor: per stream, which frames form a segment (with StreamKV's
merges), the compression decisions that need only the segment (guidance), and the segment's
entry in the summary index (Redis, or embedded in this actor). Index writes never fail the
call that makes them: an IndexWriter journals them and catches the index up when it is
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
    compressor: object  # pipeline.compression strategy
    frames: int = 0  # frames pushed so far
    last_time: float | None = None  # of the last frame pushed
    source: dict | None = None  # the coordinator's note of the stream's source, kept here for a restarted one
    # closed segments not recorded as committed yet, numbered segmenter.closed - len .. - 1: a
    # restarted coordinator commits those its previous process did not
    closed: list[Wire] = field(default_factory=list)


class CompressorWorker:
    CONCURRENCY_GROUPS = {"health": 1}

    def __init__(self, model_dir: str, device: str = "cpu", index_url: str | None = None):
        from pipeline.model import load_model

        self.model = load_model(model_dir, device=device)  # guidance runs the language model
        self.index: SegmentIndex = RedisIndex(index_url) if index_url else EmbeddedIndex()
        self.writer = IndexWriter(self.index)
        self.streams: dict[str, _Stream] = {}

    def open(self, spec: StreamSpec, state: dict | None = None) -> None:
        """Start a stream, or host it again after a restart with `state` as `held` gives it:
        frames pushed and segments closed so far, the last frame's time, its live source."""
        from pipeline.compression import make_compressor
        from pipeline.segmenter import Segmenter

        config = spec.config(self.model.dims.tokens_per_frame)
        state = state or {}
        stream = _Stream(spec, Segmenter(config), make_compressor(self.model, config), state.get("frames", 0),
                         state.get("last_time"), state.get("source"))
        stream.segmenter.closed = state.get("segments", 0)
        self.streams[spec.stream_id] = stream
        if stream.segmenter.closed:  # recorded by this actor's previous process: not in the journal
            self.writer.note_incomplete(spec.stream_id)

    def note_source(self, stream_id: str, source: dict | None) -> None:
        lookup(self.streams, stream_id).source = source

    def push(self, stream_id: str, features: Wire) -> list[Wire]:
        """Frames in; the segments they close out (zero or more)."""
        import torch

        from cache_store.wire import pack_segment, unpack_features

        stream = lookup(self.streams, stream_id)
        closed = []
        for item in unpack_features(features, "cpu", torch.float32):
            closed += stream.segmenter.push(item)
            stream.frames, stream.last_time = item.frames[1], item.times[1]
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

    def decide(self, stream_id: str, update: Wire) -> list[list[int]] | None:
        """Compression decisions about one encoded segment (guidance): per layer, blocks to keep."""
        from cache_store.wire import unpack_update

        decoded = unpack_update(update, self.model.device, self.model.dtype)
        lookup(self.streams, stream_id).compressor.decide(decoded)
        return decoded.keep

    def held(self) -> dict[str, dict]:
        """Every stream held here, for a restarted coordinator: open's state, the open segment's
        frames as pack_features' meta and tokens (plain values: the coordinator does not import
        the wire formats), and the closed segments not known to be committed (by reference)."""
        from cache_store.wire import pack_features

        held = {}
        for sid, s in self.streams.items():
            features = pack_features(s.segmenter.open.items if s.segmenter.open else [])
            held[sid] = {"frames": s.frames, "last_time": s.last_time, "segments": s.segmenter.closed,
                         "source": s.source, "open": (features.meta["features"], features.arrays.get("features")),
                         "closed": [ray.put(segment) for segment in s.closed]}
        return held

    def record(self, stream_id: str, committed: int, *updates: Wire) -> None:
        """The committed segments' entries in the summary index; `committed`: how many segments
        of the stream are committed now (their closed copies kept here are let go)."""
        import torch

        from cache_store.wire import unpack_update

        self.writer.put([segment_record(stream_id, unpack_update(update, "cpu", torch.float32))
                         for update in updates if update.meta["units"]])
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


def segment_record(stream_id: str, update) -> SegmentRecord:
    """The segment's summary per layer: its summary block's mean key, else the mean of its frames'."""
    import torch

    from pipeline.kv_store import mean_key

    units = update.units
    summary = [i for i, u in enumerate(units) if u.kind == "summary"]
    chosen = summary or list(range(len(units)))
    layers = len(update.kv[0])
    vectors = np.stack([
        torch.stack([mean_key(update.kv[i][layer][0]) for i in chosen]).mean(0).flatten().cpu().numpy()
        for layer in range(layers)
    ]).astype(np.float32)  # [layers, Hkv * d]
    return SegmentRecord(
        stream_id=stream_id, segment_id=update.segment,
        frame_range=(units[0].frames[0], units[-1].frames[1]), time_range=(units[0].times[0], units[-1].times[1]),
        unit_ids=[u.uid for u in units], summary=vectors, extra={},
    )
