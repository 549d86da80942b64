"""The stream coordinator: the one place that orders each stream's work across the actors.

    ingest(frames) -> prefill.encode_frames (batched across streams) -> compressor.push
      -> closed segments: prefill.encode_and_commit (every compression decision made there)
      -> every answer replica applies the updates, the index records them (the updates' KV goes
         by object ref, owned here: see actors/calls.py settled)
    ask(question)  -> compressor.flush (+ the segment path above) -> one answer replica

Its concerns live in files of their own: stream_state.py (the record of a stream), sources.py
(sources, on the pool of decoder hosts of decoder_pool.py / decoder_host.py), ingest.py (frames in, segments committed), answer_pool.py (questions and the pool),
recovery.py (calls that restore a restarted actor), takeover.py (a restarted coordinator),
calls.py (how actors are called, the retry helper), messages.py (typed messages, source states).

Memory is replicated: the prefill actor's replica and each answer actor's replica apply the same
updates in order, so when one actor dies and Ray restarts it empty, it is restored from a
snapshot of a surviving replica and the interrupted call is retried; the compressor's open
segment is rebuilt by replaying the frames pushed since the last closed segment. Nothing already
ingested is lost. It is also the FrameSink that decoder actors deliver frames to.

A coordinator that runs under a name (a deployment's, deploy/app.py) names its model actors
after itself and detaches them, so they outlive its process: when it dies and Ray restarts it, the
new one adopts them and the streams they hold (_adopt). Everything committed is kept: updates the
old one had not delivered yet are held by the prefill actor until delivered, replicas behind are
restored, segments the compressor had closed but the old one had not committed are committed,
and each stream's frame count, time and open segment come back from the compressor. Its decoder
hosts (each decoding many streams' sources) are named and detached too: they keep the chunks whose calls died with the old process,
and send them again once the new one has taken their stream over (resync); frames the old one
had consumed are skipped by time, so no frame is lost or repeated. A stream whose decoder died
too gets its live source (policy "drop") or open upload attached again; a file waits for
attach_source. Lost are the chunks of other callers whose ingest had not returned (they got an
error). `shutdown` removes the model actors and decoder hosts for good. A decoder host that dies
while the coordinator runs: its live pulls and open uploads are attached again on another host
(sources.py), as a takeover does.

Answer actors form a pool that scales with the questions: a question goes to the least busy
actor; while every actor has `answer_target_ongoing` questions in flight another one is started
(up to `max_answerers`) and given a replica of every stream before it takes questions; one the
cluster cannot place within `answer_start_timeout_s` (no autoscaler, or no node left to add) is
given up, and the next busy spell tries again; an extra actor idle for `answer_idle_s` is
removed. Each actor holds every stream (memory is bounded per stream), so any of them can answer
any question.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
from dataclasses import asdict

import ray

from actors.answer_pool import AnswerPoolMixin, AnswerReplica
from actors.calls import (ACTOR_LOST, NAMESPACE, START_TIMEOUT_S, UNDO_TIMEOUT_S, Coalescer, awaited, bounded,
                          detached)
from actors.decoder_pool import DecoderPool, default_capacity
from actors.ingest import VISION_CALL_FRAMES, VISION_CALL_S, IngestMixin
from actors.release import LARGE_BUFFERS_MAPPED, release_freed_memory, with_env
from actors.recovery import RESTORE_TIMEOUT_S, RecoveryMixin
from actors.sources import SourcesMixin
from actors.spec import StreamSpec
from actors.stream_state import StreamState
from actors.takeover import TakeoverMixin
from actors.thumbnailer import ThumbnailKeeper
from cache_store.thumbnails import open_thumbnails
from pipeline.errors import CapacityError, InvalidInputError

__all__ = ["StreamCoordinator", "NAMESPACE"]
# How long status() waits for the compressor actor to say how the index stands (it answers on a
# thread of its own, so only while the actor is restarting)
INDEX_HEALTH_TIMEOUT_S = 5.0
# Until the model actors have answered a creation once, they may still be loading the model (more
# than START_TIMEOUT_S on a busy node): the first creations wait this long for them instead
MODEL_LOAD_TIMEOUT_S = 600.0
log = logging.getLogger(__name__)


# The model actors and their wire formats import torch and transformers, so they are imported on
# first use: this module stays light, because every decoder actor holding the coordinator's
# handle (its frame sink) imports it.
def _model_actors() -> dict[str, type]:
    from actors.answerer import AnswerWorker
    from actors.compressor import CompressorWorker
    from actors.prefill import PrefillWorker

    return {"prefill": PrefillWorker, "compressor": CompressorWorker, "answerer": AnswerWorker}


class StreamCoordinator(TakeoverMixin, SourcesMixin, IngestMixin, AnswerPoolMixin, RecoveryMixin):
    """The Ray actor (created as ray.remote(StreamCoordinator)); its concerns live in the mixins'
    files: sources.py, ingest.py, answer_pool.py, recovery.py, takeover.py."""

    def __init__(self, model_dir: str, device: str = "cpu", answerers: int = 1, index_url: str | None = None,
                 actor_cpus: float = 0.1, placement: dict[str, dict] | None = None, max_answerers: int | None = None,
                 answer_target_ongoing: int = 2, answer_idle_s: float = 120.0,
                 restore_timeout_s: float = RESTORE_TIMEOUT_S, answer_start_timeout_s: float = 600.0,
                 decoder_capacity: int | None = None, decoder_idle_s: float = 60.0):
        """placement: extra Ray options per actor kind ("prefill", "compressor", "answerer",
        "decoder"), e.g. {"prefill": {"num_gpus": 1}, "decoder": {"resources": {"decoder": 1}}}
        to pin kinds to node types (see ray_cluster.yaml). answerers / max_answerers: the answer
        pool's size range (max defaults to min: a fixed pool). answer_start_timeout_s: how long
        a new answer actor may wait to be placed (an autoscaler adds a node in minutes) before
        the pool gives up growing this time. restore_timeout_s: how long a restarted prefill
        actor waits for a replica holding every committed update (one unreachable, or catching
        up) before the stream is declared lost; when every replica answers that it holds none
        (they restarted empty), it is lost at once."""
        self.placement = placement or {}
        self.model_dir, self.device, self.actor_cpus = model_dir, device, actor_cpus
        self.min_answerers = max(1, answerers)
        self.max_answerers = max(self.min_answerers, max_answerers or self.min_answerers)
        if answer_target_ongoing < 1 or answer_idle_s <= 0 or answer_start_timeout_s <= 0:
            raise InvalidInputError("answer_target_ongoing must be >= 1, answer_idle_s and answer_start_timeout_s > 0")
        self.answer_target_ongoing, self.answer_idle_s = answer_target_ongoing, answer_idle_s
        self.answer_start_timeout_s = answer_start_timeout_s
        self.restore_timeout_s = restore_timeout_s
        self.name = ray.get_runtime_context().get_actor_name() or None  # see the module doc
        self.prefill = self._spawn("prefill", "prefill", model_dir, device)
        self.compressor = self._spawn("compressor", "compressor", model_dir, index_url)  # CPU-only: no device
        self.thumbnailer = ThumbnailKeeper(open_thumbnails(index_url), spawn=detached)  # (the web console's)
        kept = self._named_answerers()  # a previous process's, if any
        self._answerer_names = (f"answerer{i}" for i in itertools.count(max(kept, default=-1) + 1))
        self.answerers = [self._new_answerer(ready=True, name=f"answerer{i}") for i in kept]
        self.answerers += [self._new_answerer(ready=True) for _ in range(self.min_answerers - len(self.answerers))]
        self._scaling: asyncio.Task | None = None
        self._idle_watch: asyncio.Task | None = None
        self.streams: dict[str, StreamState] = {}
        self._creating: set[str] = set()  # ids of streams being created
        # the model's input side (px) and frames per unit of visual tokens, asked once (create_stream)
        self._input_shape: tuple[int, int] | None = None
        self._models_up = False  # the model actors answered a creation (loaded): START_TIMEOUT_S from then on
        self.restarts = {"prefill": 0, "compressor": 0, "answerer": 0, "coordinator": 0}
        self.scaling_events = {"answerers_added": 0, "answerers_removed": 0, "answerers_unplaced": 0}
        self._restoring: dict[str, asyncio.Lock] = {}  # one restore at a time per actor
        self._vision = Coalescer(self._encode_batch)  # (frames, future) of every stream
        self._vision_s_per_frame = VISION_CALL_S / VISION_CALL_FRAMES  # the last call's
        self.decoders = DecoderPool(self.name, self.placement.get("decoder", {}), decoder_capacity or default_capacity(),
                                    decoder_idle_s, on_lost=self._decoder_host_lost)
        if self.name:
            self.decoders.adopt_blocking()  # the hosts a previous process started, with their sources
            self._adopt()

    def _spawn(self, kind: str, name: str, *args):
        """A model actor; under a named coordinator, named after it and detached (or the one of
        that name that outlived a previous coordinator process)."""
        worker = _model_actors()[kind]
        groups = getattr(worker, "CONCURRENCY_GROUPS", None)  # fixed at class level: not an .options() key
        actor_class = ray.remote(concurrency_groups=groups)(worker) if groups else ray.remote(worker)
        options = {"num_cpus": self.actor_cpus, "max_restarts": -1, **self.placement.get(kind, {})}
        if kind in ("prefill", "answerer"):  # (they make and free buffers the size of a segment's KV)
            options = with_env(options, LARGE_BUFFERS_MAPPED)
        if self.name:
            options.update(name=f"{self.name}.{name}", namespace=NAMESPACE, lifetime="detached",
                           get_if_exists=True)
        return actor_class.options(**options).remote(*args)

    async def create_stream(self, stream_id: str, method: str = "rekv", options: dict | None = None,
                            system_prompt: str | None = "You are a helpful assistant.", *,
                            max_streams: int | None = None, start_timeout_s: float = START_TIMEOUT_S) -> dict:
        """Open a stream on every model actor. Never waits on placement for longer than
        `start_timeout_s` (CapacityError; MODEL_LOAD_TIMEOUT_S until they first answer); past `max_streams` streams (those being created
        included) CapacityError(at_limit=True). On any failure, a timeout or the call's
        cancellation, the half-made stream is closed everywhere and its id is free again."""
        if not isinstance(stream_id, str) or not stream_id or stream_id in self.streams or stream_id in self._creating:
            raise InvalidInputError(f"stream id {stream_id!r} is empty or already in use")
        if max_streams is not None and len(self.streams) + len(self._creating) >= max_streams:
            raise CapacityError(f"the server holds its maximum of {max_streams} streams: delete one or retry later",
                                at_limit=True)
        spec = StreamSpec(stream_id, method, dict(options or {}), system_prompt)
        config = spec.config()  # ConfigError here, before any actor holds state
        self._creating.add(stream_id)  # taken from here: a concurrent create of the id would undo this one
        replicas = [r for r in self.answerers if r.ready]  # one being added copies it (_add_answerer)
        try:
            async def open_everywhere():
                snapshot = self.prefill.open.remote(spec)  # (by reference, as snapshot_refs)
                await asyncio.gather(*[r.handle.restore.remote(spec, snapshot, 0) for r in replicas])  # (open's errors)
                await self.compressor.open.remote(spec)
                if self._input_shape is None:
                    self._input_shape = tuple(await self.prefill.input_shape.remote())

            bound = start_timeout_s if self._models_up else max(start_timeout_s, MODEL_LOAD_TIMEOUT_S)
            await bounded(open_everywhere(), bound, "the model actors did not answer")
            self._models_up = True
            for replica in replicas:
                replica.streams.add(stream_id)
            self._register(StreamState(spec, config.frame_rate, frames_per_unit=self._input_shape[1]))
        except BaseException:  # a timeout, an actor's error, or this call cancelled: undo, detached
            await asyncio.shield(detached(self._close_everywhere(stream_id, replicas)))
            raise
        self._creating.discard(stream_id)
        return await self.status(stream_id)

    async def _close_everywhere(self, stream_id: str, replicas: list[AnswerReplica]) -> None:
        """Close a half-made stream on the model actors (each call bounded: an actor that does not
        answer runs it after the open it undoes), then free its id."""
        try:
            calls = [self.compressor.close.remote(stream_id), self.prefill.close.remote(stream_id),
                     *[r.handle.close.remote(stream_id) for r in replicas]]
            done, pending = await asyncio.wait([asyncio.ensure_future(awaited(c)) for c in calls],
                                               timeout=UNDO_TIMEOUT_S)
            for task in pending:
                task.cancel()
            if pending or any(t.exception() for t in done):
                log.warning("stream %r: a half-made stream was not closed on every actor", stream_id)
        finally:
            self._creating.discard(stream_id)

    def _register(self, stream: StreamState) -> StreamState:
        stream.chunks = Coalescer(functools.partial(self._segment_batch, stream))
        stream.commits = Coalescer(functools.partial(self._commit_batch, stream))
        self.streams[stream.spec.stream_id] = stream
        return stream

    def list_streams(self) -> list[str]:
        return sorted(self.streams)

    async def status(self, stream_id: str) -> dict:
        stream = self._stream(stream_id)
        source = None
        if stream.decoder is not None:
            with contextlib.suppress(*ACTOR_LOST):  # its host just died: the pool attaches it again
                source = await stream.decoder.status.remote()
        # decoded and dropped: by every source the stream had; pending: by its current one
        pending = source and max(0, source["frames_decoded"] - source["frames_dropped"]
                                 - (stream.frames_seen - stream.source.attached_at))
        return {
            "stream_id": stream_id, "method": stream.spec.method, "state": "lost" if stream.lost else "live",
            "mode": stream.source.mode, "frames_ingested": stream.frames_seen,
            "frames_decoded": source and stream.source.retired["decoded"] + source["frames_decoded"],
            "frames_dropped": source and stream.source.retired["dropped"] + source["frames_dropped"],
            "frames_pending": pending, "source_state": source and source["state"],
            # the current source's skipped corrupt packets, and why its frames are not the whole video
            "packets_skipped": source and source.get("packets_skipped"), "warning": source and source.get("warning"),
            "segments": stream.applied, "last_time": stream.last_time,
            "recoveries": stream.recoveries, "restarts": dict(self.restarts), "batching": dict(stream.batching),
            # the source's error is newer than a note from the stream's adoption
            "last_error": stream.lost or (source and source["last_error"]) or stream.last_error,
            "adopted": stream.adopted,
            "index": await self.index_health(stream_id),
        }

    async def index_health(self, stream_id: str | None = None) -> dict:
        """The segment index (Redis) as the compressor's writer sees it (cache_store/index_writer.py):
        state healthy | degraded (| unknown: the compressor actor did not answer), pending writes
        and deletes, the last error, outages, resets, records rewritten / dropped / unrecoverable,
        the last catch-up's duration. With a stream: its pending writes and whether the journal
        holds it whole. Answers never read the index, so they go on whatever its state."""
        try:
            health = await asyncio.wait_for(self.compressor.index_health.remote(stream_id), INDEX_HEALTH_TIMEOUT_S)
        except (*ACTOR_LOST, asyncio.TimeoutError) as error:
            return {"state": "unknown", "last_error": f"the compressor actor did not answer: {type(error).__name__}"}
        return {**asdict(health), "state": health.state.value}

    async def memory(self, stream_id: str) -> dict[str, int]:
        stream = self._stream(stream_id)
        await self._published(stream)
        return await self._on_answerer(stream, self._holder(stream_id), lambda a: a.memory.remote(stream_id))

    async def segments(self, stream_id: str) -> list[dict]:
        stream = self._stream(stream_id)
        await self._published(stream)
        return await self._on_compressor(stream, lambda: self.compressor.segments.remote(stream_id))

    async def delete_stream(self, stream_id: str) -> dict:
        stream = self._stream(stream_id)
        # its source stops and its host lets it go now (bounded: one not answering is forgotten)
        await self.decoders.drop(stream.decoder)
        stream.decoder = None
        async with stream.lock:
            await self._published(stream, settled_only=True)  # (a lost stream's deliveries failed: deleted all the same)
            stream.deleted = True
            index_keys = await self.compressor.close.remote(stream_id)
            await self.thumbnailer.drop(stream_id)
            await self.prefill.close.remote(stream_id)
            await asyncio.gather(*[r.handle.close.remote(stream_id) for r in self.answerers])
            for replica in self.answerers:
                replica.streams.discard(stream_id)
            del self.streams[stream_id]  # only now: until the actors have closed it, its id names no new stream
            stream.chunks = stream.commits = None  # they refer back to the stream: free it now, not at a GC
        await asyncio.to_thread(release_freed_memory)  # its pages to the OS, not only to malloc (actors/release.py)
        async with stream.chunk_turn:  # chunks waiting for an earlier one that will not come now fail
            stream.next_chunk = math.inf
            stream.chunk_turn.notify_all()
        return {"stream_id": stream_id, "index_keys_deleted": index_keys}

    async def shutdown(self) -> int:
        """Remove the model actors for good (a named coordinator's outlive it otherwise), with
        every stream; returns how many streams there were. Then kill this actor."""
        self.decoders.shutdown()
        for handle in [self.prefill, self.compressor, *[r.handle for r in self.answerers]]:
            ray.kill(handle, no_restart=True)
        count, self.streams, self.answerers = len(self.streams), {}, []
        return count

    async def thumbnails(self, stream_id: str, frames: list[int]) -> list:
        """The kept thumbnail nearest each frame (a cache_store.thumbnails.Thumbnail, or None)."""
        self._stream(stream_id)
        return await self.thumbnailer.nearest(stream_id, [int(f) for f in frames])

    def workers(self) -> dict:
        """Actor handles, for operations (and fault-injection tests)."""
        return {"prefill": self.prefill, "compressor": self.compressor, "answerers": [r.handle for r in self.answerers],
                "decoders": {sid: s.decoder for sid, s in self.streams.items() if s.decoder is not None},
                "decoder_hosts": self.decoders.handles(), "decoder_pool": self.decoders.stats()}

    async def index_keys(self, stream_id: str) -> int:
        if stream_id in self.streams:
            await self._published(self.streams[stream_id])
        return await self.compressor.index_keys.remote(stream_id)

