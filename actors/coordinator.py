"""The stream coordinator: the one place that orders each stream's work across the actors.

    ingest(frames) -> prefill.encode_frames (batched across streams) -> compressor.push
      -> closed segments: prefill.encode_and_commit (guidance: per segment prefill.encode_segment
         -> compressor.decide -> prefill.commit) -> every answer replica applies the updates, the
         index records them (the updates' KV goes by object ref, owned here: see _settled)
    ask(question)  -> compressor.flush (+ the segment path above) -> one answer replica

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
actors are named and detached too: they keep the chunks whose calls died with the old process,
and send them again once the new one has taken their stream over (resync); frames the old one
had consumed are skipped by time, so no frame is lost or repeated. A stream whose decoder died
too gets its live source (policy "drop") or open upload attached again; a file waits for
attach_source. Lost are the chunks of other callers whose ingest had not returned (they got an
error). `shutdown` removes the model actors and decoders for good.

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
import contextvars
import functools
import itertools
import logging
import math
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

from actors.decoder import TERMINAL_STATES, DecoderActor
from actors.spec import ReplicaGapError, StreamSpec
from actors.thumbnailer import ThumbnailKeeper
from cache_store.envelope import features_wire
from cache_store.thumbnails import open_thumbnails
from pipeline.decode import DecodeConfig
from pipeline.errors import AnswerResumeError, CapacityError, InvalidInputError, StreamLostError, UnknownStreamError
from pipeline.frames import check_frames, check_times

ACTOR_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)
RECOVERY_ATTEMPTS = 3
RESTORE_TIMEOUT_S = 120.0
# Unfinished chunks a decoder may have per stream. More lets more queue up to be segmented and
# committed together (fewer calls per frame: 1 stream of bench.pipeline's medium model ingests
# 6-10% faster with 4 than with 2, see BENCHMARKS.md); a live source keeps 2, so that it lags
# little before dropping.
DEFAULT_IN_FLIGHT = {"block": 4, "drop": 2}
# Vision calls: with many streams, one call for everything queued would hold every stream's
# segments back until all of it is encoded, leaving the language model's thread idle meanwhile.
# So a call takes one model batch of PrefillWorker.encode_frames, or more where a batch takes
# less than VISION_CALL_S (a cheap tower: per-call costs would then dominate). BENCHMARKS.md
VISION_CALL_FRAMES = 32
VISION_CALL_S = 0.1
# Deployments' named coordinators live here, and their model actors, named "<coordinator>.<kind>"
# (an actor cannot read the namespace it was created in)
NAMESPACE = "streamkv"
# How long such a coordinator's decoders wait for a restarted process to take their streams over
# (a takeover takes seconds; a node to restart on may take minutes)
DECODER_RECONNECT_S = 300.0
# How long status() waits for the compressor actor to say how the index stands (it answers on a
# thread of its own, so only while the actor is restarting)
INDEX_HEALTH_TIMEOUT_S = 5.0
# How long creating a stream (or attaching a source) waits for the actors it needs to answer: a
# decoder the cluster cannot place, a model actor that is restarting or unplaceable. Past it the
# half-made stream is undone and the caller gets CapacityError (HTTP 503 with Retry-After).
START_TIMEOUT_S = 30.0
# How long undoing (closing a half-made stream, stopping a decoder) waits for each actor; calls
# not answered by then still run in order after the ones they undo
UNDO_TIMEOUT_S = 10.0
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


def _detached(coroutine) -> asyncio.Task:
    """Run `coroutine` as a task of its own, outside the caller's Ray task context (a caller that
    awaits it shields it too). A caller that goes away (ray.cancel, recursive by default) cancels
    the actor calls submitted in its context, and a model actor's call that is already running
    then still runs to the end but reports TaskCancelledError: its effect (a segment flushed, an
    update applied) would be done yet unknown to the coordinator. So stream work runs in these
    tasks."""
    return asyncio.get_running_loop().create_task(coroutine, context=contextvars.Context())


async def _settled(refs) -> list[tuple[ray.ObjectRef, Any]]:
    """A call's return objects (one ref, or a list with num_returns), each with its value, once
    the call is done (its errors raised here). This actor owns the objects its calls return, so
    they outlive the actor that made them; awaiting a value also pulls a copy to this node, which
    Ray recovers the object from if the maker's node is lost while the copy is held."""
    refs = list(refs) if isinstance(refs, list) else [refs]
    return list(zip(refs, await asyncio.gather(*refs)))


async def _awaited(ref):
    """`await ref` as a coroutine (for asyncio.wait_for / wait)."""
    return await ref


async def _bounded(awaitable, timeout_s: float, what: str):
    """`awaitable` within `timeout_s`; past it CapacityError (`what`: why, for the caller)."""
    try:
        return await asyncio.wait_for(_awaited(awaitable), timeout_s)
    except asyncio.TimeoutError:
        raise CapacityError(f"{what} within {timeout_s:g} s: the cluster has no room now; retry later",
                            retry_after_s=max(1.0, min(timeout_s, 30.0))) from None


def _snapshot_refs(handle, stream_id: str) -> list[ray.ObjectRef]:
    """A replica's snapshot and how many updates it holds, as two references: the snapshot goes
    to the actor it restores through the object store, not through this process."""
    return handle.snapshot.options(num_returns=2).remote(stream_id)


async def _snapshot_of(handle, stream_id: str) -> tuple[ray.ObjectRef, int]:
    """_snapshot_refs once the snapshot is taken (its errors raised here), with the count's value."""
    snapshot, applied = _snapshot_refs(handle, stream_id)
    return snapshot, await applied


def _groups(items: list, sizes: list[int], limit: int):
    """Consecutive groups of `items` whose sizes add up to at most `limit` (an item larger than
    that alone)."""
    group, total = [], 0
    for item, size in zip(items, sizes):
        if group and total + size > limit:
            yield group
            group, total = [], 0
        group.append(item)
        total += size
    if group:
        yield group


def _pending(ranges: list, tokens: np.ndarray | None) -> list:
    """Frames with their (frame, time) ranges (pack_features' meta) as _Stream.pending entries."""
    return [((f[0], f[1]), tokens[i], (t[0], t[1])) for i, (f, t) in enumerate(ranges)]


def _get(call, timeout_s: float = 120.0):
    """ray.get(call()) for code that may block (__init__), once the actor answers: as
    StreamCoordinator._until_alive."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(call())
        except ACTOR_LOST:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _existing_decoder(name: str | None):
    """The decoder actor called `name` if it is alive (it outlived a previous process)."""
    if name is None:
        return None
    try:
        handle = ray.get_actor(name, namespace=NAMESPACE)
        ray.get(handle.status.remote(), timeout=30)
    except (ValueError, GetTimeoutError, *ACTOR_LOST):
        return None
    return handle


@dataclass(eq=False)
class _AnswerReplica:
    """An answer actor of the pool and the streams it holds a replica of."""

    handle: Any
    name: str
    streams: set[str] = field(default_factory=set)
    ready: bool = False  # takes questions (a new actor first receives every stream)
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)


class _Coalescer:
    """Hands everything queued so far to `drain` in one call, one call at a time, in queue order:
    items that queue up behind a running call go together into the next one (batching under
    load), and an item queued while nothing runs goes at once (no added latency)."""

    def __init__(self, drain):
        self.drain, self.items, self.running = drain, [], None

    def put(self, item) -> None:
        self.items.append(item)
        if self.running is None or self.running.done():
            self.running = _detached(self._run())  # it serves every caller that queued, not only this one

    async def _run(self) -> None:
        while self.items:
            batch, self.items = self.items, []
            await self.drain(batch)


@dataclass
class _Chunk:
    tokens: np.ndarray  # [T, n, hidden] visual tokens of the chunk's frames
    times: Any  # as the caller gave them (checked when the chunk's turn comes)
    ingested: asyncio.Future  # the stream's frame count, once the chunk's segments are committed
    may_repeat: bool = False  # sent again by a decoder after a restart: frames up to last_time are skipped


def _done_future() -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


def _settle(future: asyncio.Future, result, source: asyncio.Future) -> None:
    """Finish `future` like `source`: its exception, else `result`."""
    if not future.done():
        error = source.exception()
        future.set_exception(error) if error else future.set_result(result)


@dataclass
class _Stream:
    spec: StreamSpec
    frame_rate: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    chunk_turn: asyncio.Condition = field(default_factory=asyncio.Condition)  # decoder chunks in seq order
    next_chunk: int = 0
    frames_seen: int = 0
    segments: int = 0  # closed by the segmenter (the next one's number)
    last_time: float | None = None
    applied: int = 0  # updates committed to every replica
    published: int = 0  # of them, how many are known to have reached every replica and the index
    # the open segment's frames: (frame range, visual tokens [n, hidden], time range) each
    pending: list[tuple[tuple[int, int], np.ndarray, tuple[float, float]]] = field(default_factory=list)
    recoveries: int = 0
    last_error: str | None = None
    deleted: bool = False  # set when deletion starts: no work for it may reach the actors after that
    # None once deleted (_current guards their use)
    chunks: _Coalescer | None = field(init=False)  # encoded chunks on their way to the segmenter (_segment_batch)
    commits: _Coalescer | None = field(init=False)  # closed segments on their way to the replicas (_commit_batch)
    committing: asyncio.Future | None = None  # done when the last queued segments are committed
    # chunks segmented, compressor pushes and commits they took: how much queued-up work coalesced
    batching: dict[str, int] = field(default_factory=lambda: {"chunks": 0, "pushes": 0, "commits": 0})
    publishing: list[asyncio.Task] = field(default_factory=list)  # updates on their way to replicas
    lost: str | None = None  # why the stream's memory has a gap (a failed commit, no replica left)
    mode: str | None = None  # "push" or "pull" once a source is attached
    decoder: Any = None  # the DecoderActor reading the source
    decoder_name: str | None = None  # under a named coordinator (a restarted one finds it by name)
    attached_at: int = 0  # frames ingested when it was attached
    # its attach_source arguments if a restarted coordinator attaches it again when the decoder
    # is gone too: a live pull (policy "drop") or an upload not closed
    resumable_source: tuple | None = None
    resent_below: int = 0  # decoder chunks numbered below this may repeat frames (resync)
    retired: dict[str, int] = field(default_factory=lambda: {"decoded": 0, "dropped": 0})  # by sources before it
    adopted: bool = False  # taken over by a restarted coordinator
    resumed: bool = False  # its adopted decoder resumed (resume_sources)


class StreamCoordinator:
    def __init__(self, model_dir: str, device: str = "cpu", answerers: int = 1, index_url: str | None = None,
                 actor_cpus: float = 0.1, placement: dict[str, dict] | None = None, max_answerers: int | None = None,
                 answer_target_ongoing: int = 2, answer_idle_s: float = 120.0,
                 restore_timeout_s: float = RESTORE_TIMEOUT_S, answer_start_timeout_s: float = 600.0):
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
        self.compressor = self._spawn("compressor", "compressor", model_dir, device, index_url)
        self.thumbnailer = ThumbnailKeeper(open_thumbnails(index_url), spawn=_detached)  # (the web console's)
        kept = self._named_answerers()  # a previous process's, if any
        self._answerer_names = (f"answerer{i}" for i in itertools.count(max(kept, default=-1) + 1))
        self.answerers = [self._new_answerer(ready=True, name=f"answerer{i}") for i in kept]
        self.answerers += [self._new_answerer(ready=True) for _ in range(self.min_answerers - len(self.answerers))]
        self._scaling: asyncio.Task | None = None
        self._idle_watch: asyncio.Task | None = None
        self.streams: dict[str, _Stream] = {}
        self._creating: set[str] = set()  # ids of streams being created
        self._frame_size: int | None = None  # the model's input side (px), asked once (_sized)
        self._models_up = False  # the model actors answered a creation (loaded): START_TIMEOUT_S from then on
        self.restarts = {"prefill": 0, "compressor": 0, "answerer": 0, "coordinator": 0}
        self.scaling_events = {"answerers_added": 0, "answerers_removed": 0, "answerers_unplaced": 0}
        self._restoring: dict[str, asyncio.Lock] = {}  # one restore at a time per actor
        self._vision = _Coalescer(self._encode_batch)  # (frames, future) of every stream
        self._vision_s_per_frame = VISION_CALL_S / VISION_CALL_FRAMES  # the last call's
        if self.name:
            self._adopt()

    def _spawn(self, kind: str, name: str, *args):
        """A model actor; under a named coordinator, named after it and detached (or the one of
        that name that outlived a previous coordinator process)."""
        worker = _model_actors()[kind]
        groups = getattr(worker, "CONCURRENCY_GROUPS", None)  # fixed at class level: not an .options() key
        actor_class = ray.remote(concurrency_groups=groups)(worker) if groups else ray.remote(worker)
        options = {"num_cpus": self.actor_cpus, "max_restarts": -1, **self.placement.get(kind, {})}
        if self.name:
            options.update(name=f"{self.name}.{name}", namespace=NAMESPACE, lifetime="detached",
                           get_if_exists=True)
        return actor_class.options(**options).remote(*args)

    def _new_answerer(self, ready: bool, name: str | None = None) -> _AnswerReplica:
        name = name or next(self._answerer_names)
        return _AnswerReplica(self._spawn("answerer", name, self.model_dir, self.device), name, ready=ready)

    def _named_answerers(self) -> list[int]:
        """Numbers of the answer actors named after this coordinator that exist (a previous
        process's)."""
        if not self.name:
            return []
        prefix = f"{self.name}.answerer"
        return sorted(int(a["name"][len(prefix):]) for a in ray.util.list_named_actors(all_namespaces=True)
                      if a["namespace"] == NAMESPACE and a["name"].startswith(prefix)
                      and a["name"][len(prefix):].isdigit())

    def _adopt(self) -> None:
        """Take over the streams the model actors of a previous process of this coordinator hold
        (nothing on a first start). Blocking calls: no other call runs before __init__ returns.
        A stream not held by both the prefill and the compressor actor (its creation or deletion
        was cut short, or one of them restarted while no coordinator ran) cannot be made whole,
        and is closed everywhere."""
        hosted = _get(self.prefill.held.remote)
        segmenting = _get(self.compressor.held.remote)
        holding = {r.name: _get(r.handle.held.remote) for r in self.answerers}
        for sid in set(hosted) | set(segmenting) | {sid for held in holding.values() for sid in held}:
            if sid not in hosted or sid not in segmenting:
                log.warning("stream %r: held by the %s actor only; closing it", sid,
                            "prefill" if sid in hosted else "compressor" if sid in segmenting else "answer")
                _get(lambda: self.compressor.close.remote(sid))
                _get(lambda: self.prefill.close.remote(sid))
                for replica in self.answerers:
                    _get(lambda: replica.handle.close.remote(sid))
                continue
            spec, applied, unpublished = hosted[sid]
            held = segmenting[sid]
            first = applied - len(unpublished) + 1  # the old process may not have delivered these
            # segments the compressor closed that the old process did not commit
            uncommitted = held["closed"][len(held["closed"]) - (held["segments"] - applied):] \
                if held["segments"] > applied else []
            unpublished = unpublished + self._commit_closed(spec, uncommitted, first - 1)
            applied += len(uncommitted)
            stream = _Stream(spec, spec.config().frame_rate, frames_seen=held["frames"], last_time=held["last_time"],
                             segments=held["segments"], applied=applied,
                             published=applied, adopted=True, recoveries=1)
            stream.pending = _pending(*held["open"])
            for replica in self.answerers:
                if holding[replica.name].get(sid, -1) < first - 1:  # behind even those (or without it)
                    _get(lambda: replica.handle.restore.remote(spec, *_snapshot_refs(self.prefill, sid)))
                else:
                    _get(lambda: replica.handle.apply.remote(sid, first, *unpublished))
                replica.streams.add(sid)
            if unpublished:
                _get(lambda: self.compressor.record.remote(sid, applied, *unpublished))
            self._register(stream)
            self._adopt_source(stream, held["source"] or {})
        self.restarts["coordinator"] = 1 if self.streams else 0
        if any(s.decoder for s in self.streams.values()):
            # once this __init__ has returned: a call made before that may fail, so it is retried
            resume = ray.get_runtime_context().current_actor.resume_sources.remote
            threading.Thread(target=_get, args=(resume,), name="resume-sources", daemon=True).start()

    def _commit_closed(self, spec: StreamSpec, segments: list[ray.ObjectRef], published: int) -> list[ray.ObjectRef]:
        """Commit closed segments in order, blocking (__init__), as _commit does; their updates."""
        sid, guided = spec.stream_id, spec.config().compression == "guidance"
        updates = []
        for segment in segments:
            encoded = self.prefill.encode_segment.remote(sid, segment)
            keep = _get(lambda: self.compressor.decide.remote(sid, encoded)) if guided else None
            updates.append(self.prefill.commit.remote(sid, keep, published))
            _get(lambda: updates[-1])
        return updates

    def _adopt_source(self, stream: _Stream, note: dict) -> None:
        """The adopted stream's source, from what _source_note kept: its decoder if it outlived
        the old process, else a live pull or an open upload attached again (a new decoder), else
        none. resume_sources resumes the decoder."""
        stream.mode, stream.attached_at = note.get("mode"), note.get("attached_at", 0)
        stream.retired = dict(note.get("retired", stream.retired))
        stream.resumable_source = note.get("resumable")
        decoder = _existing_decoder(note.get("decoder"))
        if decoder is not None:
            stream.decoder, stream.decoder_name = decoder, note["decoder"]
        elif stream.resumable_source:  # attached now (pushes may come), started by resume_sources
            self._attached(stream, *self._new_decoder(stream, *stream.resumable_source, first_seq=None),
                           stream.resumable_source)
            _get(lambda: self.compressor.note_source.remote(stream.spec.stream_id, self._source_note(stream)))
            stream.last_error = "taken over by a restarted coordinator: its source was attached again"
        else:
            stream.mode = None
            if note.get("decoder"):
                stream.last_error = "taken over by a restarted coordinator: its file source or closed upload was lost"
        if stream.decoder is not None:
            stream.next_chunk = -1  # its chunks wait for resume_sources

    async def resume_sources(self) -> list[str]:
        """Resume adopted streams' decoders: one that outlived the old process sends the chunks
        that process may not have consumed again (resync), a new one (a live source, an open
        upload, attached again) starts. A restarted coordinator calls it on itself, to run once
        its __init__ is done: calls a decoder makes before that fail. A new upload decoder takes
        the client's chunks from the first it is sent (their `seq` goes on; a chunk sent while
        the coordinator was down was refused, and the client sends it again). Returns the
        streams whose source runs again (none when called again)."""
        resumed = []
        waiting = [s for s in self.streams.values() if s.adopted and s.decoder is not None and not s.resumed]
        for stream in waiting:  # all marked before the first await: a concurrent call finds none of them
            stream.resumed = True
        for stream in waiting:
            try:
                first, end = await stream.decoder.resync.remote()  # (0, 0) from a new decoder
                async with stream.chunk_turn:
                    stream.next_chunk, stream.resent_below = first, end
                    stream.chunk_turn.notify_all()
                await stream.decoder.start.remote()  # idempotent
            except Exception as error:  # noqa: BLE001 - the stream stays, without a source
                ray.kill(stream.decoder, no_restart=True)
                stream.decoder = stream.decoder_name = stream.mode = stream.resumable_source = None
                stream.last_error = f"its source could not be attached again ({type(error).__name__}: {error})"
                await self._note_source(stream)
                continue
            resumed.append(stream.spec.stream_id)
        return resumed

    # ---- streams --------------------------------------------------------------------------
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
        replicas = list(self.answerers)
        try:
            async def open_everywhere():
                snapshot = self.prefill.open.remote(spec)  # (by reference, as _snapshot_refs)
                await asyncio.gather(*[r.handle.restore.remote(spec, snapshot, 0) for r in replicas])  # (open's errors)
                await self.compressor.open.remote(spec)

            bound = start_timeout_s if self._models_up else max(start_timeout_s, MODEL_LOAD_TIMEOUT_S)
            await _bounded(open_everywhere(), bound, "the model actors did not answer")
            self._models_up = True
            for replica in replicas:
                replica.streams.add(stream_id)
            self._register(_Stream(spec, config.frame_rate))
        except BaseException:  # a timeout, an actor's error, or this call cancelled: undo, detached
            await asyncio.shield(_detached(self._close_everywhere(stream_id, replicas)))
            raise
        self._creating.discard(stream_id)
        return await self.status(stream_id)

    async def _close_everywhere(self, stream_id: str, replicas: list[_AnswerReplica]) -> None:
        """Close a half-made stream on the model actors (each call bounded: an actor that does not
        answer runs it after the open it undoes), then free its id."""
        try:
            calls = [self.compressor.close.remote(stream_id), self.prefill.close.remote(stream_id),
                     *[r.handle.close.remote(stream_id) for r in replicas]]
            done, pending = await asyncio.wait([asyncio.ensure_future(_awaited(c)) for c in calls],
                                               timeout=UNDO_TIMEOUT_S)
            for task in pending:
                task.cancel()
            if pending or any(t.exception() for t in done):
                log.warning("stream %r: a half-made stream was not closed on every actor", stream_id)
        finally:
            self._creating.discard(stream_id)

    def _register(self, stream: _Stream) -> _Stream:
        stream.chunks = _Coalescer(functools.partial(self._segment_batch, stream))
        stream.commits = _Coalescer(functools.partial(self._commit_batch, stream))
        self.streams[stream.spec.stream_id] = stream
        return stream

    def list_streams(self) -> list[str]:
        return sorted(self.streams)

    async def attach_source(self, stream_id: str, source: str | None, decode: DecodeConfig | None = None,
                            policy: str = "block", chunk_frames: int = 8, max_in_flight: int | None = None,
                            *, start_timeout_s: float = START_TIMEOUT_S) -> dict:
        """Read the stream's frames from `source` (file path, http(s) or rtsp URL) with a decoder
        actor, or, with source None, from bytes pushed with `push` (the read timeout of a pushed
        source runs from its first byte). Backpressure: "block" loses nothing (files, uploads);
        "drop" drops the newest frames while `max_in_flight` chunks are unfinished (live
        sources), and the stream's status counts them. max_in_flight defaults by policy
        (DEFAULT_IN_FLIGHT). A stream whose source has ended (or was detached by a coordinator
        restart) takes a new one: its frames and times continue the stream's. A decoder the
        cluster cannot place within `start_timeout_s` is removed (CapacityError), as on any
        failure or cancellation."""
        stream = self._live_stream(stream_id)
        if max_in_flight is None:
            max_in_flight = DEFAULT_IN_FLIGHT.get(policy, 2)  # an unknown policy is the decoder's error
        decode = await self._sized(decode or DecodeConfig(), start_timeout_s)
        arguments = (source, decode, policy, chunk_frames, max_in_flight)
        async with stream.lock:  # one attach at a time
            previous = stream.decoder and await stream.decoder.status.remote()
            if previous and previous["state"] not in TERMINAL_STATES:
                raise InvalidInputError(f"stream {stream_id!r} already has a source ({previous['state']}): "
                                        "close it or wait until it ends")
            decoder, name = self._new_decoder(stream, *arguments)
            try:
                await _bounded(decoder.start.remote(), start_timeout_s, "no room for the stream's decoder")
            except BaseException:
                ray.kill(decoder, no_restart=True)  # placed or not: no orphan
                raise
            if previous:
                ray.kill(stream.decoder, no_restart=True)
                stream.retired = {k: stream.retired[k] + previous[f"frames_{k}"] for k in stream.retired}
            self._attached(stream, decoder, name, arguments)
            await self._note_source(stream)
        return await self.status(stream_id)

    async def _sized(self, decode: DecodeConfig, timeout_s: float) -> DecodeConfig:
        """`decode` with the model's input size (S x S, as its processor resizes every frame; frames
        already no larger are left to the processor) unless the caller set a size: no actor after
        the decoder handles more pixels than the model reads. The prefill actor is asked once."""
        if decode.size is not None:
            return decode
        if self._frame_size is None:
            self._frame_size = await _bounded(self.prefill.frame_size.remote(), timeout_s,
                                              "the prefill actor did not answer")
        return replace(decode, size=(self._frame_size, self._frame_size), shrink_only=True)

    def _new_decoder(self, stream: _Stream, source, decode: DecodeConfig, policy: str, chunk_frames: int,
                     max_in_flight: int, first_seq: int | None = 0) -> tuple[Any, str | None]:
        """A decoder actor for the stream, to start, and its name; its chunk numbers and times go
        on after the stream's (a previous source sends no more). Under a named coordinator it is
        named and detached, and waits for a restarted coordinator if this process dies."""
        stream.next_chunk = stream.resent_below = 0
        offset = 0.0 if stream.last_time is None else stream.last_time + 1 / stream.frame_rate
        options, name = {"num_cpus": 0.05, **self.placement.get("decoder", {})}, None
        if self.name:
            name = f"{self.name}.decoder.{stream.spec.stream_id}.{uuid.uuid4().hex[:8]}"
            options.update(name=name, namespace=NAMESPACE, lifetime="detached")
        decoder = DecoderActor.options(**options).remote(
            stream.spec.stream_id, source, decode, ray.get_runtime_context().current_actor, chunk_frames,
            max_in_flight, policy, time_offset=offset, first_seq=first_seq,
            reconnect_s=DECODER_RECONNECT_S if self.name else 0.0)
        return decoder, name

    @staticmethod
    def _attached(stream: _Stream, decoder, name: str | None, arguments: tuple) -> None:
        source, policy = arguments[0], arguments[2]
        stream.decoder, stream.decoder_name = decoder, name
        stream.mode, stream.attached_at = "pull" if source else "push", stream.frames_seen
        # a file read again would repeat its frames
        stream.resumable_source = arguments if source is None or policy == "drop" else None

    @staticmethod
    def _source_note(stream: _Stream) -> dict:
        """What a restarted coordinator needs of the stream's source (_adopt_source)."""
        return {"decoder": stream.decoder_name, "mode": stream.mode, "attached_at": stream.attached_at,
                "retired": dict(stream.retired), "resumable": stream.resumable_source}

    async def _note_source(self, stream: _Stream) -> None:
        """Keep _source_note with the stream's state in the compressor, for a restarted coordinator."""
        sid = stream.spec.stream_id
        await self._on_compressor(stream, lambda: self.compressor.note_source.remote(sid, self._source_note(stream)))

    def _push_decoder(self, stream_id: str):
        stream = self._live_stream(stream_id)
        if stream.mode != "push":
            detached = " (the coordinator restarted: attach a source again)" if stream.adopted and not stream.mode else ""
            raise InvalidInputError(f"stream {stream_id!r} does not take pushed bytes{detached}")
        return stream.decoder

    async def push(self, stream_id: str, chunk: bytes, seq: int | None = None) -> int:
        """Feed encoded video bytes to a push-mode source (attach_source with source=None).
        Concurrent uploaders number their chunks (`seq` from 0) so they are written in order."""
        return await self._push_decoder(stream_id).push.remote(chunk, seq)

    async def close_source(self, stream_id: str, wait_s: float | None = None) -> dict:
        """End a pushed source; with `wait_s`, wait for its frames to be ingested."""
        decoder = self._push_decoder(stream_id)
        await decoder.close.remote()
        stream = self.streams[stream_id]  # (_push_decoder found it)
        stream.resumable_source = None  # the upload is over
        await self._note_source(stream)
        return await decoder.wait.remote(wait_s) if wait_s else await decoder.status.remote()

    async def status(self, stream_id: str) -> dict:
        stream = self._stream(stream_id)
        source = await stream.decoder.status.remote() if stream.decoder is not None else None
        # decoded and dropped: by every source the stream had; pending: by its current one
        pending = source and max(0, source["frames_decoded"] - source["frames_dropped"]
                                 - (stream.frames_seen - stream.attached_at))
        return {
            "stream_id": stream_id, "method": stream.spec.method, "state": "lost" if stream.lost else "live",
            "mode": stream.mode, "frames_ingested": stream.frames_seen,
            "frames_decoded": source and stream.retired["decoded"] + source["frames_decoded"],
            "frames_dropped": source and stream.retired["dropped"] + source["frames_dropped"],
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

    def pool(self) -> dict:
        """The answer pool: actors, questions in flight on each, scaling events so far."""
        return {"answerers": [{"name": r.name, "ready": r.ready, "in_flight": r.in_flight, "streams": len(r.streams)}
                              for r in self.answerers],
                "min": self.min_answerers, "max": self.max_answerers, **self.scaling_events}

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
        if stream.decoder is not None:
            with contextlib.suppress(asyncio.TimeoutError, *ACTOR_LOST):  # one not answering is killed anyway
                await asyncio.wait_for(_awaited(stream.decoder.stop.remote()), UNDO_TIMEOUT_S)
            # its process goes now, even while other handles to it (a caller's) are alive
            ray.kill(stream.decoder, no_restart=True)
        async with stream.lock:
            await self._published(stream)
            stream.deleted = True
            index_keys = await self.compressor.close.remote(stream_id)
            await self.thumbnailer.drop(stream_id)
            await self.prefill.close.remote(stream_id)
            await asyncio.gather(*[r.handle.close.remote(stream_id) for r in self.answerers])
            for replica in self.answerers:
                replica.streams.discard(stream_id)
            del self.streams[stream_id]  # only now: until the actors have closed it, its id names no new stream
            stream.chunks = stream.commits = None  # they refer back to the stream: free it now, not at a GC
        async with stream.chunk_turn:  # chunks waiting for an earlier one that will not come now fail
            stream.next_chunk = math.inf
            stream.chunk_turn.notify_all()
        return {"stream_id": stream_id, "index_keys_deleted": index_keys}

    async def shutdown(self) -> int:
        """Remove the model actors for good (a named coordinator's outlive it otherwise), with
        every stream; returns how many streams there were. Then kill this actor."""
        for stream in list(self.streams.values()):
            if stream.decoder is not None:
                ray.kill(stream.decoder, no_restart=True)
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
                "decoders": {sid: s.decoder for sid, s in self.streams.items() if s.decoder is not None}}

    async def index_keys(self, stream_id: str) -> int:
        if stream_id in self.streams:
            await self._published(self.streams[stream_id])
        return await self.compressor.index_keys.remote(stream_id)

    # ---- ingest (the FrameSink contract of actors.decoder) ---------------------------------
    async def ingest(self, stream_id: str, frames, times=None, seq: int | None = None) -> int:
        """Append frames to the stream; returns the frames ingested so far, once the segments
        this chunk closed are in the stream's memory (bounded work per stream). The vision tower
        runs first, ahead of the stream's order (it is stateless), so with several chunks in
        flight one chunk's vision overlaps the previous one's segment work. Decoder chunks carry
        `seq` and are appended in seq order (Ray may start an async actor's calls in any order)."""
        stream = self._live_stream(stream_id)
        try:
            frames = check_frames(frames)
            tokens = await self._encode_frames(frames)  # [T, n, hidden]
            if seq is not None:
                async with stream.chunk_turn:
                    await stream.chunk_turn.wait_for(lambda: stream.next_chunk >= seq)
            self._current(stream)  # deleted while its frames were encoded
            ingested = asyncio.get_running_loop().create_future()
            stream.chunks.put(_Chunk(tokens, times, ingested, may_repeat=seq is not None and seq < stream.resent_below))
        finally:
            if seq is not None:
                async with stream.chunk_turn:
                    stream.next_chunk = max(stream.next_chunk, seq + 1)
                    stream.chunk_turn.notify_all()
        # the chunk's work runs detached (_segment_batch): a caller that goes away must not leave
        # frames half-appended (in the segmenter, not in the stream's count) or cancel a commit
        # later ones follow
        ingested_now = await asyncio.shield(ingested)
        if not stream.deleted and not (seq is not None and seq < stream.resent_below):  # (a resent chunk: some skipped)
            self.thumbnailer.keep(stream_id, ingested_now - len(frames), frames)
        return ingested_now

    async def _segment_batch(self, stream: _Stream, batch: list[_Chunk]) -> None:
        """Segment queued chunks in stream order, in one compressor call, and queue the segments
        they close for one commit: under load the per-call cost is paid per batch, not per chunk."""
        sid = stream.spec.stream_id
        async with stream.lock:
            accepted: list[tuple[_Chunk, int]] = []  # with the frames ingested once it is in
            tokens, times = [], []
            first, last_time = stream.frames_seen, stream.last_time
            for chunk in batch:
                chunk_tokens, chunk_times = chunk.tokens, chunk.times
                if chunk.may_repeat and last_time is not None:  # skip what the previous process consumed
                    fresh = np.asarray(chunk_times, dtype=np.float64) > last_time
                    chunk_tokens, chunk_times = chunk_tokens[fresh], np.asarray(chunk_times)[fresh]
                    if not fresh.any():
                        accepted.append((chunk, first + len(times)))
                        continue
                try:
                    chunk_times = check_times(chunk_times, len(chunk_tokens), first + len(times), last_time,
                                              stream.frame_rate)
                except InvalidInputError as error:  # this chunk alone is refused
                    chunk.ingested.set_exception(error)
                    continue
                tokens.append(chunk_tokens)
                times += chunk_times
                last_time = chunk_times[-1]
                accepted.append((chunk, first + len(times)))
            if not tokens:  # nothing new (chunks refused, or repeats only): done once earlier commits are
                committed = stream.committing or _done_future()
            else:
                committed = await self._push_frames(stream, accepted, np.concatenate(tokens), first, times, last_time)
                if committed is None:
                    return
        for chunk, frames_seen in accepted:
            committed.add_done_callback(functools.partial(_settle, chunk.ingested, frames_seen))

    async def _push_frames(self, stream: _Stream, accepted: list[tuple[_Chunk, int]], tokens: np.ndarray, first: int,
                           times: list[float], last_time: float) -> asyncio.Future | None:
        """_segment_batch's frames to the segmenter (under the stream lock), their closed segments
        queued for one commit; None (the callers told) if the compressor call failed."""
        ranges = [((first + i, first + i + 1), (t, t)) for i, t in enumerate(times)]
        wire = features_wire(tokens, *zip(*ranges))
        stream.batching["chunks"] += len(accepted)
        stream.batching["pushes"] += 1
        sid = stream.spec.stream_id
        try:
            self._current(stream)  # deleted while these chunks waited
            segments = await self._on_compressor(stream, lambda: self.compressor.push.remote(sid, wire))
        except Exception as error:  # noqa: BLE001 - the batch's callers get it
            for chunk, _ in accepted:
                chunk.ingested.set_exception(error)
            return None
        # recorded once pushed: a restarted compressor is replayed the frames before these
        stream.pending += [(frames, tokens[i], span) for i, (frames, span) in enumerate(ranges)]
        stream.frames_seen, stream.last_time = first + len(tokens), last_time
        return self._queue_commit(stream, segments)

    def _queue_commit(self, stream: _Stream, segments: list) -> asyncio.Future:
        """Commit `segments` after every segment closed before them (call under the stream lock);
        the future is done once they are committed."""
        if segments:  # the segmenter holds no frames before the last closed segment's end any more
            closed_until = segments[-1].meta["features"][-1][0][1]
            stream.segments = segments[-1].meta["segment"] + 1
            stream.pending = [p for p in stream.pending if p[0][0] >= closed_until]
        stream.committing = asyncio.get_running_loop().create_future()
        stream.commits.put((segments, stream.committing))
        return stream.committing

    async def _commit_batch(self, stream: _Stream, batch: list[tuple[list, asyncio.Future]]) -> None:
        """Commit queued segments in order, all at once. A failed commit fails the ones after it:
        the stream's memory has a gap."""
        try:
            if stream.lost:
                raise StreamLostError(f"stream {stream.spec.stream_id!r} is lost: {stream.lost}")
            await self._commit(stream, [segment for segments, _ in batch for segment in segments])
        except Exception as error:  # noqa: BLE001 - the batch's callers get it
            stream.lost = stream.lost or (
                f"segment {stream.applied + 1} could not be committed ({type(error).__name__}: {error})")
            for _, committed in batch:
                committed.set_exception(error)
        else:
            for _, committed in batch:
                committed.set_result(None)

    async def ask(self, stream_id: str, question: str, max_new_tokens: int = 64, sampling=None) -> dict:
        stream = self._live_stream(stream_id)
        with self._answer_slot() as replica:
            await self._prepare_question(stream, replica, question, max_new_tokens)
            # answers are read-only: decode outside the lock, so ingest goes on meanwhile
            return await self._on_answerer(
                stream, replica, lambda a: a.ask.remote(stream_id, question, max_new_tokens, sampling))

    async def ask_stream(self, stream_id: str, question: str, max_new_tokens: int = 64, sampling=None):
        """`ask` as it is generated (call with num_returns="streaming"): a dict with the evidence
        and prompt size, the answer text piece by piece, then a dict with the token ids. Errors
        in the question surface at the first item. An answer actor lost midway is recovered like
        `ask`'s and the answer resumes where it stopped: decoding is greedy or seeded
        (pipeline/sampling.py: the API seeds every sampled answer), so a replica holding
        the same updates generates the same items again, which are checked and skipped (if the
        stream took updates meanwhile, they differ, and the error is AnswerResumeError)."""
        stream = self._live_stream(stream_id)
        with self._answer_slot() as replica:
            await self._prepare_question(stream, replica, question, max_new_tokens)
            sent: list = []  # items yielded so far

            async def resume(answerer):
                """A new generation on `answerer`, read past the items already sent, and its next
                item (None if there is none)."""
                items = answerer.ask_stream.options(num_returns="streaming").remote(
                    stream_id, question, max_new_tokens, sampling)
                for old in sent:
                    if await (await items.__anext__()) != old:
                        raise AnswerResumeError(f"stream {stream_id!r} took updates since the answer began")
                try:
                    return items, await (await items.__anext__())
                except StopAsyncIteration:
                    return items, None

            for attempt in range(RECOVERY_ATTEMPTS):
                items, item = await self._on_answerer(stream, replica, resume)
                try:
                    while item is not None:
                        sent.append(item)
                        yield item
                        item = await (await items.__anext__())
                    return
                except StopAsyncIteration:
                    return
                except ACTOR_LOST:  # the next resume restores the replica (and counts the restart)
                    if attempt == RECOVERY_ATTEMPTS - 1:
                        raise

    async def _prepare_question(self, stream: _Stream, replica: _AnswerReplica, question: str,
                                max_new_tokens: int) -> None:
        """Validate the question, close the open segment for it, and wait until every replica
        holds every update (so any replica answers from the whole stream)."""
        sid = stream.spec.stream_id
        await self._on_answerer(stream, replica, lambda a: a.check.remote(sid, question, max_new_tokens))
        await asyncio.shield(_detached(self._close_open_segment(stream)))  # as in ingest: never half-done
        await self._published(stream)

    async def _close_open_segment(self, stream: _Stream) -> None:
        async with stream.lock:
            self._current(stream)
            segment = await self._on_compressor(stream, lambda: self.compressor.flush.remote(stream.spec.stream_id))
            committed = self._queue_commit(stream, [] if segment is None else [segment])
        await committed

    # ---- the answer pool --------------------------------------------------------------------
    @contextlib.contextmanager
    def _answer_slot(self):
        """The least busy (then least recently used) ready answer actor, counted busy for the
        block; grows the pool when every actor is at its target."""
        replica = min((r for r in self.answerers if r.ready), key=lambda r: (r.in_flight, r.last_used))
        replica.in_flight += 1
        if self._idle_watch is None and self.max_answerers > self.min_answerers:  # (a pool adopted too)
            self._idle_watch = _detached(self._remove_idle_answerers())
        if (self._scaling is None and len(self.answerers) < self.max_answerers
                and all(r.in_flight >= self.answer_target_ongoing for r in self.answerers if r.ready)):
            self._scaling = _detached(self._add_answerer())
        try:
            yield replica
        finally:
            replica.in_flight -= 1
            replica.last_used = time.monotonic()

    def _holder(self, stream_id: str) -> _AnswerReplica:
        """A ready answer actor holding the stream (a restarted one is restored on first use)."""
        return next((r for r in self.answerers if r.ready and stream_id in r.streams),
                    next(r for r in self.answerers if r.ready))

    async def _add_answerer(self) -> None:
        """Start an answer actor and give it a replica of every stream, one stream at a time
        under the stream's lock (so no update is committed meanwhile); updates committed after
        that reach it like any replica. It takes questions once it holds every stream."""
        replica = self._new_answerer(ready=False)
        self.answerers.append(replica)
        try:  # placed (an autoscaler may first add a node for it) and its model loaded
            await asyncio.wait_for(self._until_alive(replica.handle.ping.remote), self.answer_start_timeout_s)
            for stream in list(self.streams.values()):
                sid = stream.spec.stream_id
                async with stream.lock:
                    if stream.deleted or sid in replica.streams:
                        continue
                    await self._published(stream)
                    snapshot, applied = await self._on_answerer(stream, self._holder(sid), lambda a: _snapshot_of(a, sid))
                    await replica.handle.restore.remote(stream.spec, snapshot, applied)
                    replica.streams.add(sid)
            replica.ready = True
            self.scaling_events["answerers_added"] += 1
        except Exception as error:  # a background task: nobody awaits it, so say why the pool did not grow
            unplaced = isinstance(error, asyncio.TimeoutError)
            self.scaling_events["answerers_unplaced"] += unplaced
            reason = f"was not placed within {self.answer_start_timeout_s:.0f} s" if unplaced else "could not be set up"
            log.warning("answer pool: a new answer actor %s", reason, exc_info=not unplaced)
            self.answerers.remove(replica)
            ray.kill(replica.handle, no_restart=True)
        finally:
            self._scaling = None

    async def _remove_idle_answerers(self) -> None:
        """Shrink the pool back towards `answerers`: remove actors idle for `answer_idle_s`."""
        while True:
            await asyncio.sleep(min(5.0, self.answer_idle_s / 4))
            now = time.monotonic()
            for replica in list(self.answerers):
                ready = [r for r in self.answerers if r.ready]
                if (len(ready) > self.min_answerers and replica.ready and not replica.in_flight
                        and now - replica.last_used > self.answer_idle_s):
                    self.answerers.remove(replica)  # no new questions or updates go to it
                    await asyncio.gather(*[self._published(s) for s in list(self.streams.values())])
                    ray.kill(replica.handle, no_restart=True)
                    self.scaling_events["answerers_removed"] += 1

    # ---- the segment path -----------------------------------------------------------------
    async def _commit(self, stream: _Stream, segments: list) -> None:
        sid = stream.spec.stream_id
        stream.batching["commits"] += bool(segments)
        if stream.spec.config().compression != "guidance":  # decided in the prefill actor: one call
            if segments:
                self._publish(stream, await self._on_prefill(stream, lambda: _settled(
                    self.prefill.encode_and_commit.options(num_returns=len(segments)).remote(
                        sid, segments, stream.published))))
            return

        async def guided(segment):  # the one decision made elsewhere
            update = self.prefill.encode_segment.remote(sid, segment)
            await update  # its errors are the prefill actor's, not the compressor's
            keep = await self._on_compressor(stream, lambda: self.compressor.decide.remote(sid, update))
            return await _settled(self.prefill.commit.remote(sid, keep, stream.published))

        for segment in segments:  # one at a time: a restored prefill replica resumes after the last
            self._publish(stream, await self._on_prefill(stream, lambda: guided(segment)))

    def _publish(self, stream: _Stream, updates: list[tuple[ray.ObjectRef, Any]]) -> None:
        """Count committed updates and send them to every replica and the index in the background:
        Ray runs one caller's calls to an actor in submission order, and a question first waits
        for its stream's updates. The updates go on as object refs, not through this actor: each
        replica reads them from the object store. Once they and every earlier update arrived, the
        prefill actor is told with its next commit (it holds them until then: _adopt)."""
        sid, first = stream.spec.stream_id, stream.applied + 1
        refs = [ref for ref, _ in updates]
        stream.applied += len(updates)
        earlier = [t for t in stream.publishing if not t.done()]

        async def deliver(held=updates):  # holds this node's copies until every reader has them (_settled)
            await asyncio.gather(
                # the index write needs no stream state in the compressor: after a restart, just retry
                self._until_alive(lambda: self.compressor.record.remote(sid, first + len(refs) - 1, *refs)),
                *[self._on_answerer(stream, r, lambda a: a.apply.remote(sid, first, *refs))
                  for r in self.answerers if sid in r.streams])
            if earlier:
                await asyncio.wait(earlier)
            if not any(t.cancelled() or t.exception() for t in earlier):
                stream.published = max(stream.published, first + len(refs) - 1)

        stream.publishing = earlier + [asyncio.ensure_future(deliver())]

    async def _published(self, stream: _Stream) -> None:
        """Wait until every closed segment of the stream is committed (its errors belong to the
        ingest call that closed it) and every update reached every replica and the index."""
        if stream.committing is not None:
            await asyncio.wait([stream.committing])
        # shielded: a concurrent caller waits for the same tasks, and one that is cancelled must
        # not cancel them
        await asyncio.shield(asyncio.gather(*stream.publishing))
        stream.publishing = [t for t in stream.publishing if not t.done()]

    async def _encode_frames(self, frames: np.ndarray) -> np.ndarray:
        """Visual tokens, batched across streams without added latency (_Coalescer)."""
        future = asyncio.get_running_loop().create_future()
        self._vision.put((frames, future))
        return await future

    async def _encode_batch(self, batch: list[tuple[np.ndarray, asyncio.Future]]) -> None:
        """Encode queued chunks in calls of VISION_CALL_FRAMES frames or VISION_CALL_S seconds,
        whichever is more: the first chunks' tokens come back, and their segments go to the
        language model, while the rest are encoded."""
        limit = max(VISION_CALL_FRAMES, round(VISION_CALL_S / self._vision_s_per_frame))
        for group in _groups(batch, [len(frames) for frames, _ in batch], limit):
            started, frames = time.perf_counter(), sum(len(f) for f, _ in group)
            try:  # stateless: once a restarted actor answers, simply run it again
                results = await self._until_alive(lambda: self.prefill.encode_frames.remote([f for f, _ in group]))
                self._vision_s_per_frame = (time.perf_counter() - started) / frames
            except Exception as error:  # noqa: BLE001 - handed to every waiting stream
                results = [error] * len(group)
            for (_, future), tokens in zip(group, results):
                if not future.done():  # its caller may have been cancelled
                    future.set_exception(tokens) if isinstance(tokens, Exception) else future.set_result(tokens)

    # ---- calls with recovery --------------------------------------------------------------
    async def _on_prefill(self, stream: _Stream, call):
        async def restore():
            # From any answer actor that holds every committed update (publication may still be
            # on its way). Not through answer-actor recovery, which restores from the prefill
            # actor: with both lost at once that would wait on itself.
            # A replica that says it holds no such stream restarted empty: once every one does,
            # there is nothing to wait for.
            sid = stream.spec.stream_id
            deadline = time.monotonic() + self.restore_timeout_s
            while True:
                hope = False  # a replica may yet answer with it: unreachable now, or catching up
                for replica in [r for r in self.answerers if sid in r.streams]:
                    try:
                        snapshot, applied = await _snapshot_of(replica.handle, sid)
                    except UnknownStreamError:
                        continue
                    except ACTOR_LOST:
                        hope = True
                        continue
                    if applied == stream.applied:
                        return await self.prefill.restore.remote(stream.spec, snapshot, applied)
                    hope = True
                if not hope or time.monotonic() > deadline:
                    stream.lost = f"no replica holds its {stream.applied} updates (all were lost at once)"
                    raise StreamLostError(f"stream {sid!r}: {stream.lost}")
                await asyncio.sleep(0.1)

        return await self._with_recovery(stream, "prefill", call, restore)

    async def _on_compressor(self, stream: _Stream, call):
        async def restore():
            await self.compressor.open.remote(stream.spec, {
                "frames": stream.frames_seen, "last_time": stream.last_time, "segments": stream.segments,
                "source": self._source_note(stream)})
            if stream.pending:  # replay the open segment's frames into the restarted segmenter
                frames, tokens, times = zip(*stream.pending)
                await self.compressor.push.remote(stream.spec.stream_id, features_wire(np.stack(tokens), frames, times))

        return await self._with_recovery(stream, "compressor", call, restore)

    async def _on_answerer(self, stream: _Stream, replica: _AnswerReplica, call):
        async def restore():
            sid = stream.spec.stream_id
            snapshot, applied = await self._on_prefill(stream, lambda: _snapshot_of(self.prefill, sid))
            await replica.handle.restore.remote(stream.spec, snapshot, applied)
            replica.streams.add(sid)

        return await self._with_recovery(stream, "answerer", lambda: call(replica.handle), restore, replica.name)

    async def _with_recovery(self, stream: _Stream, kind: str, call, restore, actor: str | None = None):
        """Run `call`; if its actor was lost (or restarted without the stream), restore the stream
        there and run it again."""
        for attempt in range(RECOVERY_ATTEMPTS):
            try:
                return await call()
            except (*ACTOR_LOST, UnknownStreamError, ReplicaGapError) as error:
                if isinstance(error, UnknownStreamError):
                    self._current(stream)  # else restore it: the actor restarted without it
                if stream.lost:  # nothing holds its whole memory: a restore would wait restore_timeout_s for none
                    raise StreamLostError(f"stream {stream.spec.stream_id!r} is lost: {stream.lost}") from error
                if attempt == RECOVERY_ATTEMPTS - 1:
                    stream.last_error = f"{type(error).__name__}: {error}"
                    raise
                stream.recoveries += 1
                self.restarts[kind] += not isinstance(error, ReplicaGapError)  # lost, or restarted empty
                async with self._restoring.setdefault(actor or kind, asyncio.Lock()):
                    await self._until_alive(restore)

    @staticmethod
    async def _until_alive(call, timeout_s: float = 120.0):
        """Run `call` once its restarting actor answers again (a Ray restart takes seconds)."""
        delay, waited = 0.1, 0.0
        while True:
            try:
                return await call()
            except ACTOR_LOST:
                if waited > timeout_s:
                    raise
                await asyncio.sleep(delay)
                waited += delay
                delay = min(2 * delay, 2.0)

    def _stream(self, stream_id: str) -> _Stream:
        try:
            return self.streams[stream_id]
        except KeyError:
            raise UnknownStreamError(f"no stream {stream_id!r}") from None

    def _current(self, stream: _Stream) -> None:
        """Raise if `stream` was deleted: work that waited for it must not reach the actors (nor be
        restored there), where its id may name a new stream by now."""
        if stream.deleted:
            raise UnknownStreamError(f"stream {stream.spec.stream_id!r} was deleted")

    def _live_stream(self, stream_id: str) -> _Stream:
        """The stream, for work that needs its memory whole."""
        stream = self._stream(stream_id)
        self._current(stream)
        if stream.lost:
            raise StreamLostError(f"stream {stream_id!r} is lost: {stream.lost}; delete it and create it again")
        return stream
