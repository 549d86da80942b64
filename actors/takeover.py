"""Takeover: a named coordinator that Ray restarted adopts the streams its model actors and
decoder hosts hold (see actors/coordinator.py's module doc for what is kept and what is lost)."""

from __future__ import annotations

import logging
import threading
from dataclasses import replace

import ray

from actors.calls import snapshot_refs, until_alive_blocking
from actors.messages import SourceNote
from actors.spec import StreamSpec
from actors.stream_state import StreamState, pending_entries

log = logging.getLogger(__name__)


class TakeoverMixin:
    """StreamCoordinator's takeover of a previous process's streams."""

    def _adopt(self) -> None:
        """Take over the streams the model actors of a previous process of this coordinator hold
        (nothing on a first start). Blocking calls: no other call runs before __init__ returns.
        A stream not held by both the prefill and the compressor actor (its creation or deletion
        was cut short, or one of them restarted while no coordinator ran) cannot be made whole,
        and is closed everywhere."""
        hosted = until_alive_blocking(self.prefill.held.remote)
        self._input_shape = tuple(until_alive_blocking(self.prefill.input_shape.remote))
        segmenting = until_alive_blocking(self.compressor.held.remote)
        holding = {r.name: until_alive_blocking(r.handle.held.remote) for r in self.answerers}
        for sid in set(hosted) | set(segmenting) | {sid for held in holding.values() for sid in held}:
            if sid not in hosted or sid not in segmenting:
                log.warning("stream %r: held by the %s actor only; closing it", sid,
                            "prefill" if sid in hosted else "compressor" if sid in segmenting else "answer")
                until_alive_blocking(lambda: self.compressor.close.remote(sid))
                until_alive_blocking(lambda: self.prefill.close.remote(sid))
                for replica in self.answerers:
                    until_alive_blocking(lambda: replica.handle.close.remote(sid))
                continue
            spec, applied, unpublished = hosted[sid].spec, hosted[sid].applied, hosted[sid].unpublished
            held = segmenting[sid]
            first = applied - len(unpublished) + 1  # the old process may not have delivered these
            # segments the compressor closed that the old process did not commit
            uncommitted = held.closed[len(held.closed) - (held.segments - applied):] if held.segments > applied else []
            unpublished = unpublished + self._commit_closed(spec, uncommitted, first - 1)
            applied += len(uncommitted)
            stream = StreamState(spec, spec.config().frame_rate, self._input_shape[1], frames_seen=held.frames,
                                 last_time=held.last_time, segments=held.segments, applied=applied,
                                 published=applied, adopted=True, recoveries=1, lone=held.lone)
            stream.pending = pending_entries(held.open_ranges, held.open_tokens)
            for replica in self.answerers:
                if holding[replica.name].get(sid, -1) < first - 1:  # behind even those (or without it)
                    until_alive_blocking(lambda: replica.handle.restore.remote(spec, *snapshot_refs(self.prefill, sid)))
                else:
                    until_alive_blocking(lambda: replica.handle.apply.remote(sid, first, *unpublished))
                replica.streams.add(sid)
            if unpublished:
                until_alive_blocking(lambda: self.compressor.record.remote(sid, applied, *unpublished))
            self._register(stream)
            self._adopt_source(stream, held.source or SourceNote())
        # sources on adopted hosts that no stream claims (an attach the old process did not finish)
        self.decoders.forget_unclaimed({s.decoder.key for s in self.streams.values() if s.decoder is not None})
        self.restarts["coordinator"] = 1 if self.streams else 0
        if any(s.decoder for s in self.streams.values()) or self.decoders.hosts:
            # once this __init__ has returned: a call made before that may fail, so it is retried
            # (it also starts watching the adopted decoder hosts, and removes idle ones)
            resume = ray.get_runtime_context().current_actor.resume_sources.remote
            threading.Thread(target=until_alive_blocking, args=(resume,), name="resume-sources", daemon=True).start()

    def _commit_closed(self, spec: StreamSpec, segments: list[ray.ObjectRef], published: int) -> list[ray.ObjectRef]:
        """Commit closed segments in order, blocking (__init__), as _commit does; their updates."""
        if not segments:
            return []
        # refs (the compressor's): as arguments of their own Ray resolves them in the prefill actor
        updates = self.prefill.encode_and_commit.options(num_returns=len(segments)).remote(
            spec.stream_id, published, *segments)
        updates = updates if isinstance(updates, list) else [updates]
        until_alive_blocking(lambda: updates[-1])
        return updates

    def _adopt_source(self, stream: StreamState, note: SourceNote) -> None:
        """The adopted stream's source, from the note the old process kept: its decoder if it
        outlived the old process, else a live pull or an open upload attached again (a new
        decoder), else none. resume_sources resumes the decoder."""
        stream.source = replace(note, decoder=None)
        decoder = self.decoders.existing(note.decoder)  # on a host that outlived the old process
        if decoder is not None:
            stream.decoder, stream.source.decoder = decoder, note.decoder
        elif note.resumable:  # attached now (pushes may come), started by resume_sources
            self._attached(stream, self._new_decoder_blocking(stream, *note.resumable, first_seq=None), note.resumable)
            until_alive_blocking(lambda: self.compressor.note_source.remote(stream.spec.stream_id, stream.source))
            stream.last_error = "taken over by a restarted coordinator: its source was attached again"
        else:
            stream.source.mode = None
            if note.decoder:
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
        self.decoders.watch_all()  # the adopted hosts: a death re-attaches their sources from now on
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
                await self.decoders.drop(stream.decoder)
                stream.decoder = stream.source.decoder = stream.source.mode = stream.source.resumable = None
                stream.last_error = f"its source could not be attached again ({type(error).__name__}: {error})"
                await self._note_source(stream)
                continue
            resumed.append(stream.spec.stream_id)
        return resumed

