"""Calls to the model actors with recovery: an actor that died (Ray restarts it empty) or that
restarted without the stream gets the stream back, from a surviving replica's snapshot or (the
compressor) from the frames since the last closed segment, and the call is made again."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import numpy as np

from actors.calls import ACTOR_LOST, snapshot_of, until_alive
from actors.messages import SegmenterState
from actors.spec import ReplicaGapError
from actors.stream_state import StreamState
from cache_store.envelope import features_wire
from pipeline.errors import StreamLostError, UnknownStreamError

if TYPE_CHECKING:
    from actors.answer_pool import AnswerReplica

RECOVERY_ATTEMPTS = 3
RESTORE_TIMEOUT_S = 120.0


class RecoveryMixin:
    """StreamCoordinator's calls with recovery, and its stream lookups."""

    async def _on_prefill(self, stream: StreamState, call):
        async def restore():
            # From any answer actor that holds every committed update (publication may still be
            # on its way). Not through answer-actor recovery, which restores from the prefill
            # actor: with both lost at once that would wait on itself.
            # A replica that says it holds no such stream restarted empty: once every one does,
            # there is nothing to wait for.
            sid = stream.spec.stream_id
            self._send_updates(stream)  # the replicas catch up with every committed update
            deadline = time.monotonic() + self.restore_timeout_s
            while True:
                hope = False  # a replica may yet answer with it: unreachable now, or catching up
                for replica in [r for r in self.answerers if sid in r.streams]:
                    try:
                        snapshot, applied = await snapshot_of(replica.handle, sid)
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

    async def _on_compressor(self, stream: StreamState, call):
        async def restore():
            await self.compressor.open.remote(stream.spec, SegmenterState(
                stream.frames_seen, stream.last_time, stream.segments, stream.source, stream.lone))
            if stream.pending:  # replay the open segment's frames into the restarted segmenter
                frames, tokens, times = zip(*stream.pending)
                await self.compressor.push.remote(stream.spec.stream_id, features_wire(np.stack(tokens), frames, times))

        return await self._with_recovery(stream, "compressor", call, restore)

    async def _on_answerer(self, stream: StreamState, replica: AnswerReplica, call):
        async def restore():
            sid = stream.spec.stream_id
            snapshot, applied = await self._on_prefill(stream, lambda: snapshot_of(self.prefill, sid))
            await replica.handle.restore.remote(stream.spec, snapshot, applied)
            replica.streams.add(sid)

        return await self._with_recovery(stream, "answerer", lambda: call(replica.handle), restore, replica.name)

    async def _with_recovery(self, stream: StreamState, kind: str, call, restore, actor: str | None = None):
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
                    await until_alive(restore)

    def _stream(self, stream_id: str) -> StreamState:
        try:
            return self.streams[stream_id]
        except KeyError:
            raise UnknownStreamError(f"no stream {stream_id!r}") from None

    def _current(self, stream: StreamState) -> None:
        """Raise if `stream` was deleted: work that waited for it must not reach the actors (nor be
        restored there), where its id may name a new stream by now."""
        if stream.deleted:
            raise UnknownStreamError(f"stream {stream.spec.stream_id!r} was deleted")

    def _live_stream(self, stream_id: str) -> StreamState:
        """The stream, for work that needs its memory whole."""
        stream = self._stream(stream_id)
        self._current(stream)
        if stream.lost:
            raise StreamLostError(f"stream {stream_id!r} is lost: {stream.lost}; delete it and create it again")
        return stream
