"""The stream coordinator: the one place that orders each stream's work across the actors.

    ingest(frames) -> prefill.encode_frames (batched across streams) -> compressor.push
      -> per closed segment: prefill.encode_segment (-> compressor.decide -> prefill.commit, when
         the decision is guidance's) -> every answer replica applies it, the index records it
    ask(question)  -> compressor.flush (+ the segment path above) -> one answer replica

Memory is replicated: the prefill actor's replica and each answer actor's replica apply the same
updates in order, so when one actor dies and Ray restarts it empty, it is restored from a
snapshot of a surviving replica and the interrupted call is retried; the compressor's open
segment is rebuilt by replaying the frames pushed since the last closed segment. Nothing already
ingested is lost. It is also the FrameSink that decoder actors deliver frames to.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

import numpy as np
import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from actors.answerer import AnswerWorker, ReplicaGapError
from actors.compressor import CompressorWorker
from actors.decoder import DecoderActor
from actors.prefill import PrefillWorker, features_wire
from actors.spec import StreamSpec
from pipeline.decode import DecodeConfig
from pipeline.errors import InvalidInputError, UnknownStreamError
from pipeline.session import check_frames, check_times

ACTOR_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)
RECOVERY_ATTEMPTS = 3


@dataclass
class _Stream:
    spec: StreamSpec
    frame_rate: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    frames_seen: int = 0
    last_time: float | None = None
    applied: int = 0  # updates committed to every replica
    pending: list[tuple[int, np.ndarray, float]] = field(default_factory=list)  # frames in the open segment
    recoveries: int = 0
    last_error: str | None = None
    publishing: list[asyncio.Task] = field(default_factory=list)  # updates on their way to replicas
    decoder: object | None = None  # a DecoderActor pulling frames from the stream's source


class StreamCoordinator:
    def __init__(self, model_dir: str, device: str = "cpu", answerers: int = 1, index_url: str | None = None,
                 actor_cpus: float = 0.1, placement: dict[str, dict] | None = None):
        """placement: extra Ray options per actor kind ("prefill", "compressor", "answerer",
        "decoder"), e.g. {"prefill": {"num_gpus": 1}, "decoder": {"resources": {"decoder": 1}}}
        to pin kinds to node types (see ray_cluster.yaml)."""
        self.placement = placement or {}

        def spawn(cls, kind, *args):
            options = {"num_cpus": actor_cpus, "max_restarts": -1, **self.placement.get(kind, {})}
            return ray.remote(cls).options(**options).remote(*args)

        self.prefill = spawn(PrefillWorker, "prefill", model_dir, device)
        self.compressor = spawn(CompressorWorker, "compressor", model_dir, device, index_url)
        self.answerers = [spawn(AnswerWorker, "answerer", model_dir, device) for _ in range(max(1, answerers))]
        self._next_answerer = itertools.cycle(range(len(self.answerers)))
        self.streams: dict[str, _Stream] = {}
        self.restarts = {"prefill": 0, "compressor": 0, "answerer": 0}
        self._restoring: dict[str, asyncio.Lock] = {}  # one restore at a time per actor
        self._batch: list[tuple[np.ndarray, asyncio.Future]] = []
        self._batch_running = False

    # ---- streams --------------------------------------------------------------------------
    async def create_stream(self, stream_id: str, method: str = "rekv", options: dict | None = None,
                            system_prompt: str | None = "You are a helpful assistant.") -> dict:
        if not isinstance(stream_id, str) or not stream_id or stream_id in self.streams:
            raise InvalidInputError(f"stream id {stream_id!r} is empty or already in use")
        spec = StreamSpec(stream_id, method, dict(options or {}), system_prompt)
        config = spec.config()  # ConfigError here, before any actor holds state
        snapshot = await self.prefill.open.remote(spec)
        await self.compressor.open.remote(spec)
        await asyncio.gather(*[a.restore.remote(spec, snapshot, 0) for a in self.answerers])
        self.streams[stream_id] = _Stream(spec, config.frame_rate)
        return await self.status(stream_id)

    def list_streams(self) -> list[str]:
        return sorted(self.streams)

    async def attach_source(self, stream_id: str, source: str | None, fps: float | None = None,
                            size: tuple[int, int] | None = None, policy: str = "block", chunk_frames: int = 8,
                            max_in_flight: int = 1) -> dict:
        """Pull the stream's frames from `source` (file path, http(s) or rtsp URL; None: pushed
        bytes) with a decoder actor. Backpressure: "block" loses nothing (files, uploads); "drop"
        drops the newest frames while `max_in_flight` chunks are unfinished (live sources), and
        the stream's status counts them. Keep `max_in_flight` at 1: with more, Ray may start this
        async actor's ingest calls out of order and a later chunk would be refused as going back
        in time (the FrameSink contract carries no sequence number yet)."""
        stream = self._stream(stream_id)
        if stream.decoder is not None:
            raise InvalidInputError(f"stream {stream_id!r} already has a source")
        sink = ray.get_runtime_context().current_actor
        stream.decoder = DecoderActor.options(**{"num_cpus": 0.05, **self.placement.get("decoder", {})}).remote(
            stream_id, source, DecodeConfig(fps=fps, size=size), sink, chunk_frames, max_in_flight, policy)
        return await stream.decoder.start.remote()

    async def push(self, stream_id: str, chunk: bytes, seq: int | None = None) -> int:
        """Feed encoded video bytes to a push-mode source (attach_source with source=None).
        Concurrent uploaders number their chunks (`seq` from 0) so they are written in order."""
        return await self._decoder(stream_id).push.remote(chunk, seq)

    async def close_source(self, stream_id: str, wait_s: float | None = None) -> dict:
        """End a pushed source; with `wait_s`, wait for its frames to be ingested."""
        decoder = self._decoder(stream_id)
        await decoder.close.remote()
        return await decoder.wait.remote(wait_s) if wait_s else await decoder.status.remote()

    async def status(self, stream_id: str) -> dict:
        stream = self._stream(stream_id)
        source = await stream.decoder.status.remote() if stream.decoder is not None else None
        return {
            "stream_id": stream_id, "method": stream.spec.method, "frames_ingested": stream.frames_seen,
            "frames_decoded": source and source["frames_decoded"], "frames_dropped": source and source["frames_dropped"],
            "source_state": source and source["state"], "segments": stream.applied, "last_time": stream.last_time,
            "recoveries": stream.recoveries, "restarts": dict(self.restarts),
            "last_error": stream.last_error or (source and source["last_error"]),
        }

    async def memory(self, stream_id: str) -> dict[str, int]:
        stream = self._stream(stream_id)
        await self._published(stream)
        return await self._on_answerer(stream, 0, lambda a: a.memory.remote(stream_id))

    async def segments(self, stream_id: str) -> list[dict]:
        stream = self._stream(stream_id)
        await self._published(stream)
        return await self._on_compressor(stream, lambda: self.compressor.segments.remote(stream_id))

    async def delete_stream(self, stream_id: str) -> dict:
        stream = self._stream(stream_id)
        if stream.decoder is not None:
            await stream.decoder.stop.remote()
        async with stream.lock:
            await self._published(stream)
            del self.streams[stream_id]
            index_keys = await self.compressor.close.remote(stream_id)
            await self.prefill.close.remote(stream_id)
            await asyncio.gather(*[a.close.remote(stream_id) for a in self.answerers])
        return {"stream_id": stream_id, "index_keys_deleted": index_keys}

    def workers(self) -> dict:
        """Actor handles, for operations (and fault-injection tests)."""
        return {"prefill": self.prefill, "compressor": self.compressor, "answerers": list(self.answerers)}

    async def index_keys(self, stream_id: str) -> int:
        if stream_id in self.streams:
            await self._published(self.streams[stream_id])
        return await self.compressor.index_keys.remote(stream_id)

    # ---- ingest (the FrameSink contract of actors.decoder) ---------------------------------
    async def ingest(self, stream_id: str, frames, times=None) -> int:
        stream = self._stream(stream_id)
        frames = check_frames(frames)
        async with stream.lock:
            times = check_times(times, len(frames), stream.frames_seen, stream.last_time, stream.frame_rate)
            tokens = await self._encode_frames(frames)  # [T, n, hidden]
            first = stream.frames_seen
            stream.pending += [(first + i, tokens[i], times[i]) for i in range(len(frames))]
            wire = features_wire(tokens, first, times)
            segments = await self._on_compressor(stream, lambda: self.compressor.push.remote(stream_id, wire))
            stream.frames_seen += len(frames)
            stream.last_time = times[-1]
            for segment in segments:
                await self._commit(stream, segment)
            return stream.frames_seen

    async def ask(self, stream_id: str, question: str, max_new_tokens: int = 64) -> dict:
        stream = self._stream(stream_id)
        index = next(self._next_answerer)
        async with stream.lock:
            await self._on_answerer(stream, index, lambda a: a.check.remote(stream_id, question, max_new_tokens))
            segment = await self._on_compressor(stream, lambda: self.compressor.flush.remote(stream_id))
            if segment is not None:
                await self._commit(stream, segment)
            await self._published(stream)
            # answers are read-only: decode outside the lock, so ingest goes on meanwhile
        return await self._on_answerer(stream, index, lambda a: a.ask.remote(stream_id, question, max_new_tokens))

    # ---- the segment path -----------------------------------------------------------------
    async def _commit(self, stream: _Stream, segment) -> None:
        sid = stream.spec.stream_id
        guided = stream.spec.config().compression == "guidance"  # the one decision made elsewhere

        async def encode_and_commit():
            # Values, not refs, travel on: an object the prefill actor returned can be lost with it
            # (actor tasks are not reconstructed), and the replicas still need the update.
            update = await self.prefill.encode_segment.remote(sid, segment, not guided)
            if not guided:
                return update
            keep = await self._on_compressor(stream, lambda: self.compressor.decide.remote(sid, update))
            return await self.prefill.commit.remote(sid, keep)

        update = await self._on_prefill(stream, encode_and_commit)
        stream.applied += 1
        closed_until = segment.meta["features"][-1][0][1]  # frames before it are in a closed segment
        stream.pending = [p for p in stream.pending if p[0] >= closed_until]
        sequence = stream.applied
        # Replicas and the index catch up in the background: Ray runs one caller's calls to an
        # actor in submission order, and a question first waits for its stream's updates.
        stream.publishing = [t for t in stream.publishing if not t.done()] + [
            # the index write needs no stream state in the compressor: after a restart, just retry
            asyncio.ensure_future(self._until_alive(lambda: self.compressor.record.remote(sid, update))),
            *[asyncio.ensure_future(self._on_answerer(stream, i, lambda a: a.apply.remote(sid, sequence, update)))
              for i in range(len(self.answerers))],
        ]

    async def _published(self, stream: _Stream) -> None:
        """Wait until every committed update of the stream reached every replica and the index."""
        tasks, stream.publishing = stream.publishing, []
        await asyncio.gather(*tasks)

    async def _encode_frames(self, frames: np.ndarray) -> np.ndarray:
        """Cross-stream batching without added latency: a vision call goes out at once; requests
        that arrive while it runs are sent together as the next call."""
        future = asyncio.get_running_loop().create_future()
        self._batch.append((frames, future))
        if not self._batch_running:
            self._batch_running = True
            asyncio.get_running_loop().create_task(self._run_batches())
        return await future

    async def _run_batches(self) -> None:
        while self._batch:
            batch, self._batch = self._batch, []
            try:  # stateless: once a restarted actor answers, simply run it again
                results = await self._until_alive(lambda: self.prefill.encode_frames.remote([f for f, _ in batch]))
            except Exception as error:  # noqa: BLE001 - handed to every waiting stream
                for _, future in batch:
                    future.set_exception(error)
                continue
            for (_, future), tokens in zip(batch, results):
                future.set_result(tokens)
        self._batch_running = False

    # ---- calls with recovery --------------------------------------------------------------
    async def _on_prefill(self, stream: _Stream, call):
        async def restore():
            await self._published(stream)  # the answer replica must hold every committed update
            snapshot, applied = await self._on_answerer(stream, 0, lambda a: a.snapshot.remote(stream.spec.stream_id))
            await self.prefill.restore.remote(stream.spec, snapshot, applied)

        return await self._with_recovery(stream, "prefill", call, restore)

    async def _on_compressor(self, stream: _Stream, call):
        async def restore():
            await self.compressor.open.remote(stream.spec)
            if stream.pending:  # replay the open segment's frames into the restarted segmenter
                first = stream.pending[0][0]
                tokens = np.stack([p[1] for p in stream.pending])
                replay = features_wire(tokens, first, [p[2] for p in stream.pending])
                await self.compressor.push.remote(stream.spec.stream_id, replay)

        return await self._with_recovery(stream, "compressor", call, restore)

    async def _on_answerer(self, stream: _Stream, index: int, call):
        answerer = self.answerers[index]

        async def restore():
            snapshot, applied = await self._on_prefill(stream, lambda: self.prefill.snapshot.remote(stream.spec.stream_id))
            await answerer.restore.remote(stream.spec, snapshot, applied)

        return await self._with_recovery(stream, "answerer", lambda: call(answerer), restore, f"answerer{index}")

    async def _with_recovery(self, stream: _Stream, kind: str, call, restore, actor: str | None = None):
        """Run `call`; if its actor was lost (or restarted without the stream), restore the stream
        there and run it again."""
        for attempt in range(RECOVERY_ATTEMPTS):
            try:
                return await call()
            except (*ACTOR_LOST, UnknownStreamError, ReplicaGapError) as error:
                if isinstance(error, UnknownStreamError) and stream.spec.stream_id not in self.streams:
                    raise
                if attempt == RECOVERY_ATTEMPTS - 1:
                    stream.last_error = f"{type(error).__name__}: {error}"
                    raise
                stream.recoveries += 1
                self.restarts[kind] += isinstance(error, ACTOR_LOST)
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

    def _decoder(self, stream_id: str):
        decoder = self._stream(stream_id).decoder
        if decoder is None:
            raise InvalidInputError(f"stream {stream_id!r} has no source attached")
        return decoder

    def _stream(self, stream_id: str) -> _Stream:
        try:
            return self.streams[stream_id]
        except KeyError:
            raise UnknownStreamError(f"no stream {stream_id!r}") from None
