"""Ingest: frames in, segments committed to every replica.

    ingest(frames) -> prefill.encode_frames (batched across streams) -> compressor.push
      -> closed segments: prefill.encode_and_commit (every compression decision is made there,
         guidance scoring too: it runs the model the prefill actor holds) -> every answer
         replica applies the updates, the index records them (the updates' KV goes by object
         ref, owned by the coordinator: see actors/calls.py settled)

The coordinator is the FrameSink that decoder actors deliver frames to (actors/decoder_sink.py).
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

import numpy as np
import ray

from actors.calls import detached, groups, settled, until_alive
from actors.messages import LoneFrames
from actors.stream_state import Chunk, StreamState, done_future, settle
from cache_store.envelope import features_wire
from pipeline.errors import InvalidInputError, StreamLostError
from pipeline.frames import check_frames, check_times

# Vision calls: with many streams, one call for everything queued would hold every stream's
# segments back until all of it is encoded, leaving the language model's thread idle meanwhile.
# So a call takes one model batch of PrefillWorker.encode_frames, or more where a batch takes
# less than VISION_CALL_S (a cheap tower: per-call costs would then dominate). BENCHMARKS.md
VISION_CALL_FRAMES = 32
VISION_CALL_S = 0.1
# Committed updates go to the answer replicas and the index in batches: one apply call per
# replica and one index call for this many updates, or for those committed within this long of the
# first of them (questions and reads send what is waiting at once). BENCHMARKS.md "Data path cost"
PUBLISH_UPDATES = 4
PUBLISH_DELAY_S = 0.5


class IngestMixin:
    """StreamCoordinator's ingest and segment path."""

    async def ingest(self, stream_id: str, frames, times=None, seq: int | None = None) -> int:
        """Append frames to the stream; returns the frames ingested so far, once the segments
        this chunk closed are in the stream's memory (bounded work per stream). The vision tower
        runs first, ahead of the stream's order (it is stateless), so with several chunks in
        flight one chunk's vision overlaps the previous one's segment work. Decoder chunks carry
        `seq` and are appended in seq order (Ray may start an async actor's calls in any order)."""
        stream = self._live_stream(stream_id)
        try:
            frames = check_frames(frames)
            # [T, n, hidden]; where a unit takes several frames, they are paired in stream order
            tokens = await self._encode_frames(frames) if stream.frames_per_unit == 1 else None
            if seq is not None:
                async with stream.chunk_turn:
                    await stream.chunk_turn.wait_for(lambda: stream.next_chunk >= seq)
            self._current(stream)  # deleted while its frames were encoded
            ingested = asyncio.get_running_loop().create_future()
            stream.chunks.put(Chunk(tokens, times, ingested, may_repeat=seq is not None and seq < stream.resent_below,
                                    pixels=None if tokens is not None else frames))
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

    async def _segment_batch(self, stream: StreamState, batch: list[Chunk]) -> None:
        """Segment queued chunks in stream order, in one compressor call, and queue the segments
        they close for one commit: under load the per-call cost is paid per batch, not per chunk."""
        async with stream.lock:
            accepted: list[tuple[Chunk, int]] = []  # with the frames ingested once it is in
            rows, times = [], []  # per frame: visual tokens, or pixels where units take several frames
            first, last_time = stream.frames_seen, stream.last_time
            for chunk in batch:
                chunk_rows, chunk_times = (chunk.tokens if chunk.pixels is None else chunk.pixels), chunk.times
                if chunk.may_repeat and last_time is not None:  # skip what the previous process consumed
                    fresh = np.asarray(chunk_times, dtype=np.float64) > last_time
                    chunk_rows, chunk_times = chunk_rows[fresh], np.asarray(chunk_times)[fresh]
                    if not fresh.any():
                        accepted.append((chunk, first + len(times)))
                        continue
                try:
                    chunk_times = check_times(chunk_times, len(chunk_rows), first + len(times), last_time,
                                              stream.frame_rate)
                except InvalidInputError as error:  # this chunk alone is refused
                    chunk.ingested.set_exception(error)
                    continue
                rows.append(chunk_rows)
                times += chunk_times
                last_time = chunk_times[-1]
                accepted.append((chunk, first + len(times)))
            if not rows:  # nothing new (chunks refused, or repeats only): done once earlier commits are
                committed = stream.committing or done_future()
            else:
                committed = await self._push_frames(stream, accepted, np.concatenate(rows), first, times)
                if committed is None:
                    return
        for chunk, frames_seen in accepted:
            committed.add_done_callback(functools.partial(settle, chunk.ingested, frames_seen))

    async def _units(self, stream: StreamState, pixels: np.ndarray, times: list[float], first: int,
                     whole_only: bool = True) -> tuple[np.ndarray | None, list, LoneFrames | None]:
        """Frames (pixels, after the stream's lone ones) as units of frames_per_unit frames: their
        visual tokens [U, n, hidden] and (frame range, time range) each, and the frames left
        over (whole_only: a partial last unit waits; else it is encoded, padded)."""
        per_unit, lone = stream.frames_per_unit, stream.lone
        if lone is not None:
            pixels, times, first = np.concatenate([lone.pixels, pixels]), lone.times + times, lone.first
        whole = len(times) // per_unit * per_unit if whole_only else len(times)
        starts = range(0, whole, per_unit)
        ranges = [((first + i, first + min(i + per_unit, whole)), (times[i], times[min(i + per_unit, whole) - 1]))
                  for i in starts]
        tokens = await self._encode_frames(pixels[:whole]) if whole else None  # [U, n, hidden]
        rest = LoneFrames(pixels[whole:], times[whole:], first + whole) if whole < len(times) else None
        return tokens, ranges, rest

    async def _push_frames(self, stream: StreamState, accepted: list[tuple[Chunk, int]], rows: np.ndarray,
                           first: int, times: list[float]) -> asyncio.Future | None:
        """_segment_batch's frames (visual tokens, or pixels to pair into units) to the segmenter
        (under the stream lock), their closed segments queued for one commit; None (the callers
        told) if a call failed."""
        stream.batching["chunks"] += len(accepted)
        stream.batching["pushes"] += 1
        try:
            self._current(stream)  # deleted while these chunks waited
            if stream.frames_per_unit == 1:
                tokens, ranges, lone = rows, [((first + i, first + i + 1), (t, t)) for i, t in enumerate(times)], None
            else:
                tokens, ranges, lone = await self._units(stream, rows, times, first)
            segments = await self._push_units(stream, tokens, ranges, lone)
        except Exception as error:  # noqa: BLE001 - the batch's callers get it
            for chunk, _ in accepted:
                chunk.ingested.set_exception(error)
            return None
        stream.frames_seen, stream.last_time = first + len(times), times[-1]
        return self._queue_commit(stream, segments)

    async def _push_units(self, stream: StreamState, tokens: np.ndarray | None, ranges: list,
                          lone: LoneFrames | None) -> list:
        """Units to the segmenter, with the frames left waiting for the rest of theirs; the
        segments they close. Recorded once pushed: a restarted compressor is replayed the units
        since the last closed segment, and given the waiting frames."""
        sid = stream.spec.stream_id
        wire = features_wire(tokens, *zip(*ranges)) if ranges else features_wire(None, [], [])
        segments = await self._on_compressor(stream, lambda: self.compressor.push.remote(sid, wire, lone))
        stream.pending += [(frames, tokens[i], span) for i, (frames, span) in enumerate(ranges)]
        stream.lone = lone
        return segments

    def _queue_commit(self, stream: StreamState, segments: list) -> asyncio.Future:
        """Commit `segments` after every segment closed before them (call under the stream lock);
        the future is done once they are committed."""
        if segments:  # the segmenter holds no frames before the last closed segment's end any more
            closed_until = segments[-1].meta["features"][-1][0][1]
            stream.segments = segments[-1].meta["segment"] + 1
            stream.pending = [p for p in stream.pending if p[0][0] >= closed_until]
        stream.committing = asyncio.get_running_loop().create_future()
        stream.commits.put((segments, stream.committing))
        return stream.committing

    async def _commit_batch(self, stream: StreamState, batch: list[tuple[list, asyncio.Future]]) -> None:
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


    async def _close_open_segment(self, stream: StreamState) -> None:
        """Close the open segment for a question: frames waiting for the rest of their unit are
        encoded as a unit of their own first, padded as the processor pads a video (chosen: the
        next frame then starts a new unit, as in pipeline/session.py)."""
        async with stream.lock:
            self._current(stream)
            segments = []
            if stream.lone is not None:  # (kept until pushed: _push_units)
                none, end = stream.lone.pixels[:0], stream.lone.first + len(stream.lone.times)
                tokens, ranges, _ = await self._units(stream, none, [], end, whole_only=False)
                segments = await self._push_units(stream, tokens, ranges, None)
            segment = await self._on_compressor(stream, lambda: self.compressor.flush.remote(stream.spec.stream_id))
            committed = self._queue_commit(stream, segments + ([] if segment is None else [segment]))
        await committed

    async def _commit(self, stream: StreamState, segments: list) -> None:
        """Encode and commit closed segments in the prefill actor, in one call: every compression
        decision is made there (guidance scoring runs the model it holds)."""
        sid = stream.spec.stream_id
        stream.batching["commits"] += bool(segments)
        if segments:
            self._publish(stream, await self._on_prefill(stream, lambda: settled(
                self.prefill.encode_and_commit.options(num_returns=len(segments)).remote(
                    sid, stream.published, *segments))))

    def _publish(self, stream: StreamState, updates: list[tuple[ray.ObjectRef, Any]]) -> None:
        """Count committed updates; they go to every replica and the index in batches
        (_send_updates): once PUBLISH_UPDATES of them are waiting, PUBLISH_DELAY_S after the first
        of them, or when something needs them there (a question, a read: _published). One apply
        call per replica and one index call per batch, not per segment."""
        stream.applied += len(updates)
        stream.unsent += updates
        if len(stream.unsent) >= PUBLISH_UPDATES:
            self._send_updates(stream)
        elif stream.send_timer is None:
            stream.send_timer = asyncio.get_running_loop().call_later(PUBLISH_DELAY_S, self._send_updates, stream)

    def _send_updates(self, stream: StreamState) -> None:
        """Send the waiting updates to every replica and the index in the background: Ray runs one
        caller's calls to an actor in submission order, and a question first waits for its
        stream's updates. The updates go on as object refs, not through this actor: each replica
        reads them from the object store. Once they and every earlier update arrived, the prefill
        actor is told with its next commit (it holds them until then: takeover)."""
        if stream.send_timer is not None:
            stream.send_timer.cancel()
            stream.send_timer = None
        if not stream.unsent or stream.deleted:
            return
        updates, stream.unsent = stream.unsent, []
        sid, last = stream.spec.stream_id, stream.applied
        first, refs = last - len(updates) + 1, [ref for ref, _ in updates]
        earlier = [t for t in stream.publishing if not t.done()]

        async def deliver(held=updates):  # holds this node's copies until every reader has them (settled)
            await asyncio.gather(
                # the index write needs no stream state in the compressor: after a restart, just retry
                until_alive(lambda: self.compressor.record.remote(sid, last, *refs)),
                *[self._on_answerer(stream, r, lambda a: a.apply.remote(sid, first, *refs))
                  for r in self.answerers if sid in r.streams])
            if earlier:
                await asyncio.wait(earlier)
            if not any(t.cancelled() or t.exception() for t in earlier):
                stream.published = max(stream.published, last)

        # detached: a question that sends them (_published) may be cancelled, with its calls
        stream.publishing = earlier + [detached(deliver())]

    async def _published(self, stream: StreamState, settled_only: bool = False) -> None:
        """Wait until every closed segment of the stream is committed (its errors belong to the
        ingest call that closed it) and every update reached every replica and the index (a
        delivery's error raised here; settled_only: only until none is in flight)."""
        if stream.committing is not None:
            await asyncio.wait([stream.committing])
        self._send_updates(stream)
        # shielded: a concurrent caller waits for the same tasks, and one that is cancelled must
        # not cancel them
        if settled_only:
            if stream.publishing:
                await asyncio.shield(asyncio.wait(stream.publishing))
        else:
            await asyncio.shield(asyncio.gather(*stream.publishing))
        stream.publishing = [t for t in stream.publishing if not t.done()]

    async def _encode_frames(self, frames: np.ndarray) -> np.ndarray:
        """Visual tokens, batched across streams without added latency (Coalescer)."""
        future = asyncio.get_running_loop().create_future()
        self._vision.put((frames, future))
        return await future

    async def _encode_batch(self, batch: list[tuple[np.ndarray, asyncio.Future]]) -> None:
        """Encode queued chunks in calls of VISION_CALL_FRAMES frames or VISION_CALL_S seconds,
        whichever is more: the first chunks' tokens come back, and their segments go to the
        language model, while the rest are encoded."""
        limit = max(VISION_CALL_FRAMES, round(VISION_CALL_S / self._vision_s_per_frame))
        for group in groups(batch, [len(frames) for frames, _ in batch], limit):
            started, frames = time.perf_counter(), sum(len(f) for f, _ in group)
            try:  # stateless: once a restarted actor answers, simply run it again
                results = await until_alive(lambda: self.prefill.encode_frames.remote([f for f, _ in group]))
                self._vision_s_per_frame = (time.perf_counter() - started) / frames
            except Exception as error:  # noqa: BLE001 - handed to every waiting stream
                results = [error] * len(group)
            for (_, future), tokens in zip(group, results):
                if not future.done():  # its caller may have been cancelled
                    future.set_exception(tokens) if isinstance(tokens, Exception) else future.set_result(tokens)

