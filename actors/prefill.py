"""The vision-encoder/prefill actor (GPU when present): visual tokens for frames of any stream,
and each stream's streaming prefill on its own replica of the stream's memory.

Its replica (sinks, local window, LiveVLM's long-term memory) is what new segments attend to. It
applies every update after the compressor has decided, and runs the decisions that need the
whole memory (VSB), which it records in the update for the other replicas.

Like the other model actors' modules, this one imports torch and transformers where they are
used, not when it is imported: a process that holds a handle to the actor imports the module
(Ray loads the class to make the handle), and a restarted coordinator's takeover waited ~3.6 s
for those imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import ray

from actors.release import release_freed_memory
from actors.spec import StreamSpec, lookup
from pipeline.errors import UnknownStreamError, UnsupportedModelError

if TYPE_CHECKING:
    from cache_store.envelope import Wire
    from pipeline.memory import StreamMemory


class _Stream:
    def __init__(self, spec: StreamSpec, model, memory: StreamMemory | None = None):
        from pipeline.answerer import Answerer  # the prompt prefix the answerers will use
        from pipeline.compression import make_compressor
        from pipeline.encoder import SegmentEncoder
        from pipeline.memory import StreamMemory

        self.spec = spec
        config = spec.config(model.dims.tokens_per_frame)
        self.encoder = SegmentEncoder(model, config)
        self.compressor = make_compressor(model, config)
        if memory is None:
            prefix = Answerer(model, config, spec.system_prompt).prefix_ids
            memory = StreamMemory(model.dims, config, self.encoder.encode_sinks(prefix))
        self.memory = memory
        self.pending = None  # the last encoded update, until its decisions come back (commit)
        self.applied = 0  # updates committed
        # committed updates not yet known to have reached every other replica and the index,
        # numbered applied - len + 1 .. applied: a restarted coordinator delivers them again
        self.unpublished: list[Wire] = []

    def acknowledge(self, published: int) -> None:
        """Forget the updates up to number `published`: every replica and the index have them."""
        del self.unpublished[: max(0, len(self.unpublished) - (self.applied - published))]


class PrefillWorker:
    # The vision tower is stateless, so it runs in its own thread beside the streams' prefill: one
    # chunk's frames are encoded while the previous chunk's segment is prefilled (stage overlap).
    # Stream calls stay in the default group, one at a time.
    CONCURRENCY_GROUPS = {"vision": 1}

    def __init__(self, model_dir: str, device: str = "cpu"):
        from pipeline.model import load_model

        self.model = load_model(model_dir, device=device)
        self.streams: dict[str, _Stream] = {}

    def open(self, spec: StreamSpec) -> Wire:
        """Start a stream; returns the snapshot (sinks only) that answer replicas start from."""
        from cache_store.wire import pack_snapshot

        if self.model.dims.frames_per_unit != 1:  # the coordinator sends frames, and counts tokens, one by one
            raise UnsupportedModelError(f"{self.model.name}: the Ray pipeline does not pair frames into temporal "
                                        "patches yet; Qwen-VL checkpoints run in StreamSession")
        self.streams[spec.stream_id] = stream = _Stream(spec, self.model)
        return pack_snapshot(stream.memory, stream_id=spec.stream_id, model_id=self.model.name)

    def restore(self, spec: StreamSpec, snapshot: Wire, applied: int) -> None:
        """Rebuild a stream's replica (after this actor restarted) from another replica's snapshot
        taken after `applied` updates."""
        from cache_store.wire import unpack_snapshot

        config = spec.config(self.model.dims.tokens_per_frame)
        memory = unpack_snapshot(snapshot, self.model.dims, config, self.model.device, self.model.dtype)
        self.streams[spec.stream_id] = stream = _Stream(spec, self.model, memory)
        stream.applied = applied

    @ray.method(concurrency_group="vision")
    def encode_frames(self, batches: list[np.ndarray], batch_size: int = 32) -> list[np.ndarray]:
        """Visual tokens for several streams' frames at once (cross-stream batching), per request."""
        sizes = [len(frames) for frames in batches]
        tokens = self.model.encode_frames(np.concatenate(batches), batch_size).float().cpu().numpy()
        return np.split(tokens, np.cumsum(sizes)[:-1])

    def encode_segment(self, stream_id: str, segment: Wire) -> Wire:
        """Encode a closed segment and hold it, uncommitted, for the compressor to decide on."""
        from cache_store.wire import pack_update

        self._encode(stream_id, segment)
        return pack_update(self.streams[stream_id].pending, stream_id=stream_id, model_id=self.model.name)

    def encode_and_commit(self, stream_id: str, segments: list[Wire], published: int) -> Wire | list[Wire]:
        """Encode and commit closed segments whose decisions need no other actor (every
        compression but guidance), in order: one call for all the segments that queued up. Call
        with num_returns=len(segments): each update is an object of its own (Ray takes a single
        return value as it is). published: see commit."""
        committed = []
        for segment in segments:
            self._encode(stream_id, segment)
            committed.append(self.commit(stream_id, None, published))
        return committed if len(committed) > 1 else committed[0]

    def _encode(self, stream_id: str, segment: Wire) -> None:
        from cache_store.wire import unpack_segment

        stream = lookup(self.streams, stream_id)
        decoded = unpack_segment(segment, self.model.device, self.model.dtype)
        stream.pending = stream.encoder.encode(stream.memory, decoded)

    def commit(self, stream_id: str, keep: list[list[int]] | None, published: int) -> Wire:
        """Apply the pending update to this replica, with the compressor's `keep` decisions or
        (None) decided here; return it, with the decisions that need the whole memory (VSB)
        recorded, for the other replicas. published: how many updates the coordinator has seen
        reach every replica and the index (the rest are held here until then)."""
        from cache_store.wire import pack_update

        stream = lookup(self.streams, stream_id)
        update, stream.pending = stream.pending, None
        if update is None:
            raise UnknownStreamError(f"stream {stream_id!r} has no encoded segment to commit")
        if keep is None:
            stream.compressor.decide(update)  # VSB: no blocks; keep-all: nothing
        else:
            update.keep = keep  # the compressor actor's guidance decision
        stream.memory.apply(update)
        stream.compressor.compact(stream.memory, update)
        stream.applied += 1
        stream.unpublished.append(pack_update(update, stream_id=stream_id, model_id=self.model.name))
        stream.acknowledge(published)
        return stream.unpublished[-1]

    def snapshot(self, stream_id: str) -> tuple[Wire, int]:
        """The replica and how many updates it holds."""
        from cache_store.wire import pack_snapshot

        stream = lookup(self.streams, stream_id)
        return pack_snapshot(stream.memory, stream_id=stream_id, model_id=self.model.name), stream.applied

    def held(self) -> dict[str, tuple[StreamSpec, int, list[ray.ObjectRef]]]:
        """Every stream held here: its spec, updates committed, and the unpublished ones (for a
        restarted coordinator, by reference: it passes them on without importing their format).
        An encoded segment awaiting its decisions is dropped: the coordinator that asked for them
        is gone."""
        for stream in self.streams.values():
            stream.pending = None
        return {sid: (s.spec, s.applied, [ray.put(u) for u in s.unpublished]) for sid, s in self.streams.items()}

    def close(self, stream_id: str) -> bool:
        closed = self.streams.pop(stream_id, None) is not None
        if closed:
            release_freed_memory()  # its KV and frames: to the OS, not only to malloc (actors/release.py)
        return closed

    def frame_size(self) -> int:
        """The square side (px) the model encodes frames at: decoders resize to it (coordinator)."""
        return self.model.frame_size

    def ping(self) -> int:
        return len(self.streams)

    def tables(self) -> dict[str, int]:
        """Sizes of the per-stream state held here (0 each once every stream is closed: the
        churn test checks that deleted streams leave nothing)."""
        return {"streams": len(self.streams)}

