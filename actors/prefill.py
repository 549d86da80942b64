"""The vision-encoder/prefill actor (GPU when present): visual tokens for frames of any stream,
and each stream's streaming prefill on its own replica of the stream's memory.

Its replica (sinks, local window, LiveVLM's long-term memory) is what new segments attend to. It
makes every compression decision about a segment it encodes (StreamKV's guidance scoring runs
the model held here; VSB needs the whole memory) and records them in the update for the other
replicas.

Like the other model actors' modules, this one imports torch and transformers where they are
used, not when it is imported: a process that holds a handle to the actor imports the module
(Ray loads the class to make the handle), and a restarted coordinator's takeover waited ~3.6 s
for those imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import ray

from actors.messages import HeldReplica
from actors.release import release_freed_memory
from actors.spec import StreamSpec, lookup

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
        config = spec.config(model.dims)
        self.encoder = SegmentEncoder(model, config)
        self.compressor = make_compressor(model, config)
        if memory is None:
            prefix = Answerer(model, config, spec.system_prompt).prefix_ids
            memory = StreamMemory(model.dims, config, self.encoder.encode_sinks(prefix))
        self.memory = memory
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
        self.page_owner = None  # this node's (actors/page_owner.py), on first commit
        self.streams: dict[str, _Stream] = {}

    def open(self, spec: StreamSpec) -> Wire:
        """Start a stream; returns the snapshot (sinks only) that answer replicas start from."""
        from cache_store.wire import pack_snapshot

        self.streams[spec.stream_id] = stream = _Stream(spec, self.model)
        return pack_snapshot(stream.memory, stream_id=spec.stream_id, model_id=self.model.name)

    def restore(self, spec: StreamSpec, snapshot: Wire, applied: int) -> None:
        """Rebuild a stream's replica (after this actor restarted) from another replica's snapshot
        taken after `applied` updates."""
        from cache_store.wire import unpack_snapshot

        config = spec.config(self.model.dims)
        memory = unpack_snapshot(snapshot, self.model.dims, config, self.model.device, self.model.dtype)
        self.streams[spec.stream_id] = stream = _Stream(spec, self.model, memory)
        stream.applied = applied

    @ray.method(concurrency_group="vision")
    def encode_frames(self, batches: list[np.ndarray], batch_size: int = 32) -> list[np.ndarray]:
        """Visual tokens for several streams' frames at once (cross-stream batching), per request,
        in the model's dtype: [frames / frames_per_unit, n, hidden] each; with deepstack
        (Qwen3-VL), each unit's visual tokens and deepstack features stacked, [units, 1 + k, n,
        hidden] (cache_store/wire.py pack_features' layout). A request of whole units (a lone last
        frame is padded as the processor pads it) keeps its units its own."""
        import torch

        from cache_store.pages import to_numpy

        per_unit = self.model.dims.frames_per_unit
        if per_unit > 1 and any(len(frames) % per_unit for frames in batches[:-1]):  # a padded unit: alone
            return [r for frames in batches for r in self.encode_frames([frames], batch_size)]
        units = [-(-len(frames) // per_unit) for frames in batches]
        # in the model's dtype (bf16 as a uint16 view: cache_store/wire.py), not float32
        tokens, deepstack = self.model.encode_units(np.concatenate(batches), batch_size)  # [U, n, hidden], [U, k, n, hidden]
        if deepstack is not None:
            tokens = torch.cat([tokens[:, None], deepstack], dim=1)
        tokens = to_numpy(tokens)
        return np.split(tokens, np.cumsum(units)[:-1])

    def encode_and_commit(self, stream_id: str, published: int, *segments: Wire) -> Wire | list[Wire]:
        """Encode closed segments, make the compression decisions about them (guidance scoring
        runs the model held here) and commit them, in order: one call for all the segments that
        queued up. Call with num_returns=len(segments): each update is an object of its own (Ray
        takes a single return value as it is). published: how many updates the coordinator has
        seen reach every replica and the index (the rest are held here until then). Segments are
        arguments of their own, so that ones passed by reference (a takeover's) are resolved.

        Each update's kept pages go to the object store once, owned by the page owner actor (so
        they outlive this actor) and mapped by every replica on the node, this one's included
        (cache_store/wire.py share_updates): one call to the owner per call here."""
        from cache_store.wire import pack_update, share_updates, unpack_segment

        stream = lookup(self.streams, stream_id)
        updates = []
        try:
            for segment in segments:
                update = stream.encoder.encode(stream.memory, unpack_segment(segment, self.model.device, self.model.dtype))
                stream.compressor.decide(update)  # guidance scores blocks with the model; VSB: none; keep-all: nothing
                stream.memory.apply(update)
                stream.compressor.compact(stream.memory, update)
                updates.append(update)
        finally:  # (those applied before an error are committed, as they are in the replica)
            with_kv = [u for u in updates if u.units]
            refs = share_updates(with_kv, stream.memory, self._put, stream_id=stream_id, model_id=self.model.name) \
                if with_kv else []
            kept = dict(zip(map(id, with_kv), refs))
            committed = [pack_update(update, stream_id=stream_id, model_id=self.model.name, kept=kept.get(id(update)))
                         for update in updates]
            stream.applied += len(committed)
            stream.unpublished += committed
        stream.acknowledge(published)  # (may let go of some of these: a restored replica's count)
        return committed if len(committed) > 1 else committed[0]

    def _put(self, pages: list) -> list[ray.ObjectRef]:
        """Each of `pages` in the object store, owned by the node's page owner (they outlive this
        actor): one call however many."""
        from actors.page_owner import local_page_owner

        if self.page_owner is None:
            self.page_owner = local_page_owner()
        return ray.get(self.page_owner.put.remote(pages))

    def snapshot(self, stream_id: str) -> tuple[Wire, int]:
        """The replica and how many updates it holds."""
        from cache_store.wire import pack_snapshot

        stream = lookup(self.streams, stream_id)
        return pack_snapshot(stream.memory, stream_id=stream_id, model_id=self.model.name), stream.applied

    def held(self) -> dict[str, HeldReplica]:
        """Every stream held here: its spec, updates committed, and the unpublished ones (for a
        restarted coordinator, by reference: it passes them on without importing their format)."""
        return {sid: HeldReplica(s.spec, s.applied, [ray.put(u) for u in s.unpublished]) for sid, s in self.streams.items()}

    def close(self, stream_id: str) -> bool:
        closed = self.streams.pop(stream_id, None) is not None
        if closed:
            release_freed_memory()  # its KV and frames: to the OS, not only to malloc (actors/release.py)
        return closed

    def input_shape(self) -> tuple[int, int]:
        """The square side (px) the model encodes frames at (decoders resize to it), and how many
        frames one unit of visual tokens encodes (Qwen-VL's temporal patch: 2; the coordinator
        pairs frames into units)."""
        return self.model.frame_size, self.model.dims.frames_per_unit

    def residence(self, stream_id: str) -> dict[str, dict[str, int]]:
        """The replica's KV by tier, in the node's object store or in this process (actors/residence.py)."""
        from actors.residence import residence

        return residence(lookup(self.streams, stream_id).memory)

    def ping(self) -> int:
        return len(self.streams)

    def tables(self) -> dict[str, int]:
        """Sizes of the per-stream state held here (0 each once every stream is closed: the
        churn test checks that deleted streams leave nothing)."""
        return {"streams": len(self.streams)}

