"""A stream's source, as the coordinator attaches it: a decoder (a source on one of the pool's
decoder hosts, actors/decoder_pool.py) reading a URL or file, or taking pushed bytes, sized to the
model's input and numbered so that its chunks go in in order. What a restarted coordinator, or
one whose decoder host died, needs to take a source up again is kept in the compressor actor
(SourceNote)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import ray

from actors.calls import ACTOR_LOST, START_TIMEOUT_S, bounded, detached
from actors.decoder_pool import SourceHandle
from actors.messages import PushReceipt, is_terminal
from actors.stream_state import StreamState
from pipeline.decode import DecodeConfig
from pipeline.errors import InvalidInputError

# Unfinished chunks a decoder may have per stream. More lets more queue up to be segmented and
# committed together (fewer calls per frame: 1 stream of bench.pipeline's medium model ingests
# 6-10% faster with 4 than with 2, see BENCHMARKS.md); a live source keeps 2, so that it lags
# little before dropping.
DEFAULT_IN_FLIGHT = {"block": 4, "drop": 2}
# How long a named coordinator's decoders wait for a restarted process to take their streams over
# (a takeover takes seconds; a node to restart on may take minutes)
DECODER_RECONNECT_S = 300.0


class SourcesMixin:
    """StreamCoordinator's sources (see actors/coordinator.py for the attributes it relies on)."""

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
            if previous and not is_terminal(previous["state"]):
                raise InvalidInputError(f"stream {stream_id!r} already has a source ({previous['state']}): "
                                        "close it or wait until it ends")
            decoder = await self._new_decoder(stream, *arguments, timeout_s=start_timeout_s)
            try:
                await bounded(decoder.start.remote(), start_timeout_s, "no room for the stream's decoder")
            except BaseException:
                await asyncio.shield(detached(self.decoders.drop(decoder)))  # placed or not: no orphan
                raise
            if previous:
                await self.decoders.drop(stream.decoder)
                retired = stream.source.retired
                stream.source.retired = {k: retired[k] + previous[f"frames_{k}"] for k in retired}
            self._attached(stream, decoder, arguments)
            await self._note_source(stream)
        return await self.status(stream_id)

    async def _sized(self, decode: DecodeConfig, timeout_s: float) -> DecodeConfig:
        """`decode` with the model's input size (S x S, as its processor resizes every frame; frames
        already no larger are left to the processor) unless the caller set a size: no actor after
        the decoder handles more pixels than the model reads."""
        if decode.size is not None:
            return decode
        if self._input_shape is None:  # (known once a stream was created: create_stream, takeover)
            self._input_shape = tuple(await bounded(self.prefill.input_shape.remote(), timeout_s,
                                                    "the prefill actor did not answer"))
        side = self._input_shape[0]
        return replace(decode, size=(side, side), shrink_only=True)

    def _decoder_arguments(self, stream: StreamState, source, decode: DecodeConfig, policy: str, chunk_frames: int,
                           max_in_flight: int, first_seq: int | None) -> tuple[tuple, dict]:
        """A new decoder's arguments (after the stream id); its chunk numbers and times go on
        after the stream's (a previous source sends no more). Under a named coordinator it waits
        for a restarted coordinator if this process dies (its host is detached)."""
        stream.next_chunk = stream.resent_below = 0
        offset = 0.0 if stream.last_time is None else stream.last_time + 1 / stream.frame_rate
        sink = ray.get_runtime_context().current_actor
        return ((source, decode, sink, chunk_frames, max_in_flight, policy),
                {"time_offset": offset, "first_seq": first_seq, "reconnect_s": DECODER_RECONNECT_S if self.name else 0.0})

    async def _new_decoder(self, stream: StreamState, *arguments, first_seq: int | None = 0,
                           timeout_s: float = START_TIMEOUT_S) -> SourceHandle:
        """A decoder for the stream, to start: a source on a decoder host with room (the pool
        starts a host when all are full; CapacityError past `timeout_s`)."""
        args, kwargs = self._decoder_arguments(stream, *arguments, first_seq=first_seq)
        return await self.decoders.place(stream.spec.stream_id, args, kwargs, timeout_s)

    def _new_decoder_blocking(self, stream: StreamState, *arguments, first_seq: int | None = 0) -> SourceHandle:
        """_new_decoder for a restarted coordinator's __init__."""
        args, kwargs = self._decoder_arguments(stream, *arguments, first_seq=first_seq)
        return self.decoders.place_blocking(stream.spec.stream_id, args, kwargs, START_TIMEOUT_S)

    @staticmethod
    def _attached(stream: StreamState, decoder: SourceHandle, arguments: tuple) -> None:
        source, policy = arguments[0], arguments[2]
        stream.decoder, stream.source.decoder = decoder, decoder.name
        stream.source.mode, stream.source.attached_at = "pull" if source else "push", stream.frames_seen
        # a file read again would repeat its frames
        stream.source.resumable = arguments if source is None or policy == "drop" else None

    async def _decoder_host_lost(self, keys: list[str]) -> None:
        """The pool's on_lost: a decoder host died with these sources. Each stream among them
        whose source can be taken up again (a live pull, an upload not closed) gets it attached
        on another host, as a restarted coordinator does (MPEG-TS picks up at the next keyframe;
        bytes the dead host had not decoded are lost, pushes after it go to the new one); a file
        is not read again (its frames would repeat): the stream is left without a source and
        says why."""
        lost = set(keys)
        for stream in list(self.streams.values()):
            if stream.decoder is not None and stream.decoder.key in lost:
                await self._decoder_lost(stream, stream.decoder)

    async def _decoder_lost(self, stream: StreamState, lost: SourceHandle) -> None:
        async with stream.lock:
            if stream.decoder is not lost or stream.deleted:  # handled already, or replaced
                return
            arguments = stream.source.resumable
            stream.decoder = stream.source.decoder = None
            if arguments:
                try:
                    decoder = await self._new_decoder(stream, *arguments, first_seq=None)
                    self._attached(stream, decoder, arguments)
                    await decoder.start.remote()
                    stream.last_error = "its decoder's process died: its source was attached again"
                except Exception as error:  # noqa: BLE001 - the stream stays, without a source
                    await self.decoders.drop(stream.decoder)
                    stream.decoder = stream.source.decoder = None
                    arguments = None
                    stream.last_error = (f"its decoder's process died and its source could not be attached again "
                                         f"({type(error).__name__}: {error}): attach a source again")
            else:
                stream.last_error = ("its decoder's process died: its file source (or closed upload) was lost; "
                                     "attach a source again (frame times continue the stream's)")
            if not arguments:
                stream.source.mode = stream.source.resumable = None
            await self._note_source(stream)

    async def _note_source(self, stream: StreamState) -> None:
        """Keep the stream's SourceNote with its state in the compressor, for a restarted coordinator."""
        sid = stream.spec.stream_id
        await self._on_compressor(stream, lambda: self.compressor.note_source.remote(sid, stream.source))

    def _push_decoder(self, stream_id: str):
        stream = self._live_stream(stream_id)
        if stream.source.mode != "push":
            lost = " (the coordinator restarted: attach a source again)" if stream.adopted and not stream.source.mode else ""
            raise InvalidInputError(f"stream {stream_id!r} does not take pushed bytes{lost}")
        return stream.decoder

    async def _on_decoder(self, stream_id: str, call):
        """`call(decoder)` on the stream's push decoder; if its host died, once more on the
        decoder that takes the upload up again (the chunk goes to it)."""
        decoder = self._push_decoder(stream_id)
        try:
            return await call(decoder)
        except ACTOR_LOST:
            await self._decoder_lost(self.streams[stream_id], decoder)
            return await call(self._push_decoder(stream_id))

    async def push(self, stream_id: str, chunk: bytes, seq: int | None = None) -> PushReceipt:
        """Feed encoded video bytes to a push-mode source (attach_source with source=None).
        Concurrent uploaders number their chunks (`seq` from 0) so they are written in order.
        Returns the decoder's PushReceipt (bytes buffered, source state): one call per chunk, the
        HTTP route asks nothing more (a status costs the decoder host and compressor a call each)."""
        return await self._on_decoder(stream_id, lambda d: d.push.remote(chunk, seq))

    async def close_source(self, stream_id: str, wait_s: float | None = None) -> dict:
        """End a pushed source; with `wait_s`, wait for its frames to be ingested."""
        await self._on_decoder(stream_id, lambda d: d.close.remote())
        decoder = self._push_decoder(stream_id)
        stream = self.streams[stream_id]  # (_push_decoder found it)
        stream.source.resumable = None  # the upload is over
        await self._note_source(stream)
        return await decoder.wait.remote(wait_s) if wait_s else await decoder.status.remote()
