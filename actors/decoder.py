"""DecoderActor: decodes ONE video stream with PyAV and feeds its frames, in chunks, to a sink actor.

    sink = MySink.remote()                       # implements the FrameSink contract below
    dec = DecoderActor.remote("cam-1", "rtsp://...", DecodeConfig(fps=2), sink,
                              chunk_frames=8, max_in_flight=2, policy="drop")
    dec.start.remote()
    ray.get(dec.status.remote())                 # answers at once, even while decoding
    ray.get(dec.wait.remote(timeout_s=60))       # status once finished / failed / stopped

Push mode (`source=None`): the owner feeds the container bytes (MPEG-TS, Matroska/WebM,
fragmented MP4: streamable formats) with `push(chunk, seq)` and ends them with `close()`.

Threads. Decoding runs in a background thread of the actor (`pipeline.decode.open_source`). The
actor is a threaded actor with concurrency groups, so control calls never queue behind work:
the default group (start, status, stop; 4 threads), "push" (push, close; 2 threads) and "wait"
(wait; 8 threads). A blocked `push` (buffer full) or a long `wait` does not delay `status`.

Chunks. Decoded (sampled) frames are grouped into chunks of `chunk_frames` frames (the last chunk
of a stream, or the chunk before a resolution change, may be shorter) and sent as
`sink.ingest.remote(stream_id, frames, times, seq=n)`. At most `max_in_flight` calls are un-finished at
any time: finished calls are collected with `ray.wait`, and each one's result is checked.

Backpressure, when a chunk is ready and `max_in_flight` calls are still un-finished:
- "block": wait for a call to finish. Nothing is lost; decoding (and, for a pushed upload, the
  uploader's `push`) slows to the sink's pace. For files and uploads.
- "drop": drop the chunk, i.e. the NEWEST decoded frames, and go on decoding, so the stream
  never falls behind a live source; the next chunk is sent once a slot is free. Dropped frames
  are counted (`frames_dropped`); the sink sees them as a gap in `times`.
Invariant once a stream has ended: frames_sent + frames_dropped == frames_decoded (frames still
buffered in a partial chunk when the stream is stopped or fails count as dropped).

Failures. A decode/source error (`VideoDecodeError`, `SourceUnavailableError`, ...) first
delivers the frames decoded before it (the partial chunk is flushed, in-flight calls are
awaited), then ends the stream in state "failed" with `last_error`. A sink call that raises, or a
sink that dies, ends the stream in state "failed" at once (decoding stops; frames not sent count
as dropped). Neither crashes the actor process: `status()` keeps answering. Each stream has its
own actor, so one stream's failure never touches another's.

Restarts. `DecoderActor` has `max_restarts=0`: a restarted decoder would start its source over
and re-send frames. The owner (stream coordinator) decides whether to start a new one.

A sink that restarts (a named coordinator, which Ray restarts when its process dies): with
`reconnect_s` > 0, a sink call lost with the sink's process does not fail the stream. The decoder
keeps the chunks such calls carried and sends nothing new (policy "drop" drops, "block" waits)
until the restarted sink calls `resync()`, which sends them again, with their own `seq`, before
anything newer; the sink skips the frames of theirs it had already consumed (by time). After
`reconnect_s` without a resync the stream fails as above, and the actor ends itself: nothing is
left to own it (it is detached, to outlive the sink's process).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, runtime_checkable
from urllib.parse import urlsplit

import numpy as np
import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from actors.messages import PushReceipt, SourceState
from pipeline.decode import DecodeConfig, FrameSource, PushBuffer, open_source
from pipeline.errors import ConfigError, InvalidInputError, PushBufferTimeout

log = logging.getLogger(__name__)

Policy = Literal["block", "drop"]
POLICIES = ("block", "drop")
_POLL_S = 0.1  # how often a blocked decode thread re-checks stop()

# a sink call lost with the sink's process (a restarting sink may take it over: see resync)
SINK_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)

__all__ = ["FrameSink", "StreamDecoder", "DecoderActor", "POLICIES"]


@runtime_checkable
class FrameSink(Protocol):
    """The contract a frame sink (the stream coordinator) implements, as a Ray actor.

    `ingest(stream_id, frames, times, seq=n)` is called as `sink.ingest.remote(...)` by the
    decoder of `stream_id`:
    - `frames`: np.ndarray [T, H, W, 3] uint8 RGB, C-contiguous, 1 <= T <= chunk_frames. It
      arrives zero-copy from the object store and is READ-ONLY; the buffer belongs to the decoder
      actor, so copy whatever must be kept after the call returns or after the decoder is gone.
    - `times`: np.ndarray [T] float64, seconds since the first frame of the source
      (`DecodedFrame.time`) plus the decoder's `time_offset`, strictly increasing within and
      across the calls of one stream.
      A jump larger than the sampling interval is a gap in the source or frames dropped by the
      "drop" policy.
    - `seq`: the chunk's number among the stream's submitted chunks (0, 1, 2, ...; a chunk the
      "drop" policy dropped gets none). Calls of one stream are SUBMITTED in seq order, and up to
      `max_in_flight` of them may be un-finished at once. A default (non-threaded, non-async)
      sink actor executes them one at a time in submission order; an async or threaded sink may
      start them in any order and must process them in `seq` order itself.
    - Returning means "consumed": the call's completion frees a slot of the decoder's window,
      which is how backpressure works. Return only once the chunk is processed, or queued in a
      bounded queue of the sink's own. The return value is ignored.
    - Raising (any exception), or the sink actor dying, FAILS the stream: the decoder stops and
      reports state "failed" with `last_error` naming the exception. Raise only when the stream
      cannot go on.
    - End of stream is not signalled through the sink: the owner learns it from the decoder's
      `status()` / `wait()` (state "finished", "failed" or "stopped").
    """

    def ingest(self, stream_id: str, frames: np.ndarray, times: np.ndarray, seq: int | None = None) -> Any: ...


class _SinkFailed(Exception):
    def __init__(self, cause: BaseException, for_good: bool = False) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.for_good = for_good  # the sink's process was lost and no restarted one took over


class _Stopped(Exception):
    pass


def _error_info(exc: BaseException, where: str) -> dict:
    cause = getattr(exc, "cause", None)  # RayTaskError carries the sink's own exception
    if isinstance(cause, BaseException):
        exc = cause
    return {"type": type(exc).__name__, "message": str(exc), "where": where}


def _warning(state: SourceState, damage: tuple[int, int], chunks_skipped: int, frames: int, error: dict | None) -> str | None:
    """Why the frames of a stream are not the whole video, in a sentence; None when they are.
    damage: (undecodable packets skipped, frames dropped as out of order after them)."""
    notes = []
    if any(damage):
        notes.append(f"the video is damaged: {damage[0]} corrupt packet(s) skipped, {damage[1]} frame(s) out of "
                     "order dropped")
    if chunks_skipped:
        notes.append(f"{chunks_skipped} numbered upload chunk(s) never arrived and were skipped")
    if state is SourceState.FAILED and frames and error is not None and error["where"] == "source":
        notes.append(f"decoding stopped early ({error['message']}): only the first {frames} sampled frames were read")
    return "; ".join(notes) or None


def _source_kind(source: object) -> str:
    if source is None:
        return "push"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "bytes"
    if isinstance(source, str) and "://" in source:
        return urlsplit(source).scheme.lower()
    return "file"


def _source_name(source: object) -> str:
    if source is None:
        return "<push stream>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    text = str(source)
    if "://" in text:
        parts = urlsplit(text)
        if parts.password is not None:  # never report credentials
            netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
            text = parts._replace(netloc=netloc).geturl()
    return text


class StreamDecoder:
    """One stream's decoder; `DecoderActor` is the Ray actor. See the module docstring.

    Args:
        stream_id: the stream's id, passed on every sink call.
        source: a local path, an http(s):// or rtsp(s):// URL, the bytes of a whole video, or
            None for push mode (bytes arrive through `push`).
        config: how to decode and sample (`DecodeConfig`); None for the defaults.
        sink: an actor handle implementing `FrameSink`.
        chunk_frames: frames per `ingest` call (>= 1).
        max_in_flight: un-finished `ingest` calls allowed at once (>= 1).
        policy: "block" or "drop", what to do when the window is full.
        push_buffer_bytes: push mode: bytes buffered before `push` blocks.
        source_format: force a demuxer (e.g. "mpegts") instead of probing.
        time_offset: seconds added to every frame's time (a stream that takes a new source).
        first_seq: push mode: the `seq` of the first chunk to write; None: whichever numbered
            chunk comes first (a decoder taking over a client's upload midway).
        reconnect_s: how long to wait for a restarted sink's `resync` after a sink call was lost
            with its process; 0: such a loss fails the stream at once.
        reorder_wait_s: push mode: how long parked chunks wait for a missing `seq` (see push).
        on_end: called by the decode thread as it exits, with the decoder and whether its sink
            was lost for good (a `DecoderHost` hosting many decoders frees this one then, and
            ends itself when no source is left to feed a sink that is gone); None: a sink lost
            for good ends the actor process (`DecoderActor`, one stream per process).
    """

    def __init__(
        self,
        stream_id: str,
        source: str | Path | bytes | None,
        config: DecodeConfig | None,
        sink: Any,
        chunk_frames: int = 8,
        max_in_flight: int = 2,
        policy: Policy = "block",
        *,
        push_buffer_bytes: int = 8 * 2**20,
        source_format: str | None = None,
        time_offset: float = 0.0,
        first_seq: int | None = 0,
        reconnect_s: float = 0.0,
        reorder_wait_s: float = 5.0,
        on_end: Callable[[StreamDecoder, bool], None] | None = None,
    ) -> None:
        if not isinstance(stream_id, str) or not stream_id:
            raise InvalidInputError(f"stream_id must be a non-empty string, got {stream_id!r}")
        if int(chunk_frames) != chunk_frames or chunk_frames < 1:
            raise ConfigError(f"chunk_frames must be an int >= 1, got {chunk_frames!r}")
        if int(max_in_flight) != max_in_flight or max_in_flight < 1:
            raise ConfigError(f"max_in_flight must be an int >= 1, got {max_in_flight!r}")
        if policy not in POLICIES:
            raise ConfigError(f"policy must be one of {POLICIES}, got {policy!r}")
        if config is not None and not isinstance(config, DecodeConfig):
            raise ConfigError(f"config must be a DecodeConfig or None, got {type(config).__name__}")
        if not hasattr(sink, "ingest"):
            raise InvalidInputError("sink must be an actor handle with an `ingest` method (FrameSink)")
        self.stream_id = stream_id
        self._source = source
        self._config = config or DecodeConfig()
        self._sink = sink
        self._chunk_frames = int(chunk_frames)
        self._max_in_flight = int(max_in_flight)
        self._policy = policy
        self._format = source_format
        self._time_offset = float(time_offset)
        self._reconnect_s = float(reconnect_s)
        self._push = PushBuffer(push_buffer_bytes) if source is None else None
        self._on_end = on_end

        self._lock = threading.Lock()  # counters and state, for consistent status snapshots
        self._state = SourceState.STARTING
        self._started = False
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._frame_source: FrameSource | None = None
        # un-finished ingest calls: (seq, frames [T, H, W, 3], times [T]), in submission order
        self._pending: dict[ray.ObjectRef, tuple[int, np.ndarray, np.ndarray]] = {}
        # chunks of calls lost with the sink's process, by seq, sent again by resync(); and since
        # when (monotonic) and why the sink is lost
        self._unacked: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._sink_lost: tuple[float, BaseException] | None = None
        self._resyncs = 0
        self._frames_decoded = 0
        self._frames_sent = 0
        self._frames_delivered = 0
        self._frames_dropped = 0
        self._chunks_sent = 0
        self._chunks_dropped = 0
        self._max_seen_in_flight = 0
        self._frame_shape: tuple[int, int] | None = None  # (height, width) of the frames sent
        self._last_error: dict | None = None
        self._started_at: float | None = None
        self._ended_at: float | None = None

        # push ordering (see push())
        self._push_cond = threading.Condition()
        self._stash: dict[int, bytes] = {}
        self._next_seq = first_seq or 0
        self._seq_from_first = first_seq is None
        self._auto_seq = 0
        self._reorder_wait_s = float(reorder_wait_s)
        self._gap_since: float | None = None  # when parked chunks started waiting for a missing one
        self._chunks_skipped = 0  # numbered pushes given up
        self._draining = False
        self._close_at: int | None = None
        self._close_deadline: float | None = None  # (monotonic) after it, missing chunks are given up at once

    @property
    def ended(self) -> bool:
        """Whether the stream has ended (finished, failed or stopped)."""
        return self._done.is_set()

    # --- control ---------------------------------------------------------------------------------

    def start(self) -> dict:
        """Start decoding in the background (idempotent); returns status()."""
        with self._lock:
            if not self._started and not self._stop.is_set():
                self._started = True
                self._started_at = time.time()
                self._thread = threading.Thread(target=self._run, name=f"decode-{self.stream_id}", daemon=True)
                self._thread.start()
        return self.status()

    def stop(self, timeout_s: float = 5.0) -> dict:
        """Stop decoding: close the source, send nothing more. In-flight sink calls are not
        cancelled. Waits up to `timeout_s` for the decode thread; returns status(). A stream
        that had already ended keeps its final state."""
        self._stop.set()
        with self._lock:
            source, thread = self._frame_source, self._thread
        if thread is None:  # never started
            self._end(SourceState.STOPPED)
        if self._push is not None:
            self._push.abort("decoder stopped")
        if source is not None:
            try:
                source.close()
            except Exception:  # closing races with the decode thread; it closes on its own
                log.debug("%s: close during stop", self.stream_id, exc_info=True)
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():  # e.g. still inside a network open with retries: it exits later
                self._end(SourceState.STOPPED)
        return self.status()

    def status(self) -> dict:
        """A snapshot; never blocks on decoding or on the sink.

        state: a SourceState's value (actors/messages.py). frames_decoded: sampled frames the source yielded;
        frames_sent: frames in submitted ingest calls; frames_delivered: frames in calls that
        completed successfully; frames_dropped: by the "drop" policy, or left unsent by a stop or
        failure. chunks_in_flight: un-finished ingest calls now (<= max_in_flight);
        max_chunks_in_flight: the most seen. waiting_for_sink: a sink call was lost with the
        sink's process and no resync came yet; resyncs: how many came. chunks_skipped: numbered
        pushes given up (push). frame_shape: [height, width] of the last chunk sent (its
        DecodeConfig.size, else the source's). last_error: None or {"type", "message", "where":
        "source" | "sink"}. packets_skipped: undecodable (corrupt) packets the decoder skipped;
        late_frames: frames it dropped as put out of order after them (pipeline.decode).
        warning: None, or why the frames sent are not the whole video (packets skipped, decoding
        ended early by an error): answers over them should say so. source: kind ("file",
        "http", "rtsp", "push", "bytes", ...), name (URL credentials masked), source_frames
        (frames decoded before sampling), stream_info, push_buffered_bytes."""
        with self._lock:
            src = self._frame_source
            info = getattr(src, "stream_info", None)
            damage = (getattr(src, "packets_skipped", 0), getattr(src, "late_frames", 0))
            return {
                "stream_id": self.stream_id,
                "state": self._state.value,
                "policy": self._policy,
                "chunk_frames": self._chunk_frames,
                "max_in_flight": self._max_in_flight,
                "frames_decoded": self._frames_decoded,
                "frames_sent": self._frames_sent,
                "frames_delivered": self._frames_delivered,
                "frames_dropped": self._frames_dropped,
                "frame_shape": None if self._frame_shape is None else list(self._frame_shape),
                "chunks_sent": self._chunks_sent,
                "chunks_dropped": self._chunks_dropped,
                "chunks_in_flight": len(self._pending),
                "max_chunks_in_flight": self._max_seen_in_flight,
                "waiting_for_sink": self._sink_lost is not None,
                "resyncs": self._resyncs,
                "chunks_skipped": self._chunks_skipped,
                "last_error": None if self._last_error is None else dict(self._last_error),
                "packets_skipped": damage[0],
                "late_frames": damage[1],
                "warning": _warning(self._state, damage, self._chunks_skipped, self._frames_decoded,
                                    self._last_error),
                "source": {
                    "kind": _source_kind(self._source),
                    "name": getattr(src, "name", None) or _source_name(self._source),
                    "source_frames": getattr(src, "frames_decoded", 0),
                    "stream_info": None if info is None else {
                        "width": info.width, "height": info.height, "fps": info.fps,
                        "duration": info.duration, "codec": info.codec,
                    },
                    "push_buffered_bytes": None if self._push is None else self._push.buffered_bytes,
                },
                "started_at": self._started_at,
                "ended_at": self._ended_at,
            }

    @ray.method(concurrency_group="wait")
    def wait(self, timeout_s: float | None = None) -> dict:
        """Block until the stream has ended (finished, failed or stopped) or `timeout_s` passed;
        returns status()."""
        self._done.wait(timeout_s)
        return self.status()

    def resync(self) -> tuple[int, int]:
        """For a restarted sink taking the stream over (see the module doc): send again, in seq
        order, every chunk whose call has not finished or was lost with the sink's process, then
        go on. Returns (first, end): the first `seq` the sink will be sent, and the end of the
        chunks sent again (their frames may have been consumed by the sink's previous process)."""
        with self._lock:
            chunks = {seq: (frames, times) for seq, frames, times in self._pending.values()}
            chunks.update(self._unacked)
            self._pending, self._unacked, self._sink_lost = {}, {}, None
            for seq in sorted(chunks):
                self._submit(seq, *chunks[seq])
            self._resyncs += 1
            return min(chunks, default=self._chunks_sent), self._chunks_sent

    # --- push mode -------------------------------------------------------------------------------

    @ray.method(concurrency_group="push")
    def push(self, chunk: bytes, seq: int | None = None, timeout_s: float | None = None) -> PushReceipt:
        """Feed container bytes (push mode only); returns the bytes still buffered and the
        stream's state (a PushReceipt: an uploader needs no status call to learn it).

        Ordering: Ray runs a threaded actor's calls in any order, so either wait for each push
        before sending the next (then `seq` may be left out), or number the chunks 0, 1, 2, ...
        with `seq`: chunks are then written to the decoder in `seq` order whatever order the
        calls run in, and a repeated `seq` is ignored (safe retries). Do not mix the two styles.
        A missing `seq` is given up (skipped) when a later chunk is parked `reorder_wait_s` after
        the gap was first seen (`chunks_skipped` in status; it is ignored if it comes later): a
        chunk its client did not send again (e.g. refused with a 503 while the coordinator
        restarted) stalls the stream no longer than that.

        Backpressure: the call that writes a chunk blocks while the decoder's buffer is full; a
        chunk that arrives before an earlier `seq` is parked and its call returns at once, so
        bound the number of un-finished pushes. After `timeout_s` the writing call raises
        `PushBufferTimeout`; its chunk stays queued, first in line (with `seq`, pushing it again
        is harmless; without, do not push it again).
        Raises InvalidInputError if the stream is not in push mode, was closed, or has ended.
        """
        if self._push is None:
            raise InvalidInputError(f"stream {self.stream_id!r} is not in push mode (it has a source)")
        if self._stop.is_set() or self._done.is_set():
            raise InvalidInputError(f"stream {self.stream_id!r} has ended ({self._state.value}); push() refused")
        data = bytes(chunk)
        with self._push_cond:
            if self._close_at is not None and (seq is None or seq >= self._close_at):
                raise InvalidInputError(f"stream {self.stream_id!r}: push() after close()")
            if seq is None:
                seq = self._auto_seq
                self._auto_seq += 1
            elif int(seq) != seq or seq < 0:
                raise InvalidInputError(f"seq must be an int >= 0, got {seq!r}")
            elif self._seq_from_first:
                self._next_seq, self._seq_from_first = int(seq), False
            if seq < self._next_seq:
                return self._receipt()  # a repeat of a chunk already written
            self._stash.setdefault(int(seq), data)  # a repeat of a parked chunk keeps the first copy
            self._skip_a_lasting_gap()
            if self._draining:
                return self._receipt()  # the active writer will write it in order
            self._draining = True
        self._drain(timeout_s)
        return self._receipt()

    def _receipt(self) -> PushReceipt:
        return PushReceipt(self._push.buffered_bytes, self._state)  # (one read each: no lock needed)

    @ray.method(concurrency_group="push")
    def close(self, chunks: int | None = None) -> None:
        """End the pushed stream. With `seq`-numbered pushes pass `chunks`, the total number of
        chunks: the end takes effect once chunks 0 .. chunks-1 are all written, or, for those
        still missing `reorder_wait_s` after the close, once they are given up (skipped). Without
        it the stream ends after the chunks already received, and missing ones (a gap in the
        `seq` numbers) are given up at once: what arrived is decoded right away. Returns at once:
        chunks parked behind a gap are written by a thread of their own (writing waits for the
        decoder to make room)."""
        if self._push is None:
            raise InvalidInputError(f"stream {self.stream_id!r} is not in push mode (it has a source)")
        with self._push_cond:
            wait = self._reorder_wait_s if chunks is not None else 0.0
            if chunks is None:
                chunks = max([self._next_seq, self._auto_seq, *(s + 1 for s in self._stash)])
            self._close_at = int(chunks)
            self._close_deadline = time.monotonic() + wait
        writer = threading.Timer(wait, self._write_parked)  # gives the missing chunks up then
        writer.daemon = True
        writer.start()

    def _write_parked(self) -> None:
        """Write what is parked, unless a writer is active (it does it), and end the upload if
        it is complete (or its missing chunks are given up)."""
        with self._push_cond:
            self._skip_a_lasting_gap()
            if self._draining:
                return
            self._draining = True
        try:
            self._drain(None)
        except Exception as exc:  # noqa: BLE001 - the stream ended meanwhile (stopped or failed)
            log.debug("%s: nothing more written after close: %s", self.stream_id, exc)

    def _skip_a_lasting_gap(self) -> None:
        """Give the missing next chunk up if parked chunks have waited for it reorder_wait_s, or
        every missing one once the close's deadline passed (call under self._push_cond)."""
        closing = self._close_deadline is not None and time.monotonic() >= self._close_deadline
        if closing and self._next_seq < self._close_at and self._next_seq not in self._stash:
            end = min([self._close_at, *self._stash])
            self._chunks_skipped += end - self._next_seq
            self._next_seq, self._gap_since = end, None
            return
        if not self._stash or self._next_seq in self._stash:
            self._gap_since = None
            return
        now = time.monotonic()
        self._gap_since = self._gap_since if self._gap_since is not None else now
        if now - self._gap_since >= self._reorder_wait_s:
            self._chunks_skipped += min(self._stash) - self._next_seq
            self._next_seq, self._gap_since = min(self._stash), None

    def _drain(self, timeout_s: float | None) -> None:
        """Write parked chunks in seq order, as the single active writer."""
        seq, data = -1, b""
        try:
            while True:
                with self._push_cond:
                    self._skip_a_lasting_gap()
                    seq = self._next_seq
                    data = self._stash.pop(seq, None)
                    if data is None:
                        self._draining = False
                        if self._close_at is not None and seq >= self._close_at:
                            self._push.close()
                        return
                    self._next_seq += 1
                self._push.push(data, timeout=timeout_s)
        except PushBufferTimeout:
            with self._push_cond:  # nothing was written: the chunk stays first in line
                self._stash[seq] = data
                self._next_seq = seq
                self._draining = False
            raise
        except BaseException:
            with self._push_cond:
                self._draining = False
                self._stash.clear()  # the stream is over (stopped, failed or closed)
            raise

    # --- decode thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        orphaned = False  # the sink's process was lost and no restarted one took over
        try:
            orphaned = self._decode()
        finally:
            if self._on_end is not None:
                self._on_end(self, orphaned)
            elif orphaned:  # detached, and its owner is gone: nothing would ever end this actor
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def _decode(self) -> bool:
        """The decode thread's work; True when it ended because the sink was lost for good."""
        images: list[np.ndarray] = []
        times: list[float] = []
        try:
            source = open_source(self._push if self._push is not None else self._source, self._config,
                                 format=self._format)
            with self._lock:
                self._frame_source = source
                if self._push is None and not self._stop.is_set():
                    self._state = SourceState.RUNNING
            if self._stop.is_set():
                source.close()
                raise _Stopped
            try:
                for frame in source:
                    if self._stop.is_set():
                        raise _Stopped
                    with self._lock:
                        self._frames_decoded += 1
                        if self._state is SourceState.STARTING:
                            self._state = SourceState.RUNNING
                    if images and frame.image.shape != images[0].shape:  # resolution change
                        self._send(images, times)
                        images, times = [], []
                    images.append(frame.image)
                    times.append(frame.time)
                    if len(images) == self._chunk_frames:
                        self._send(images, times)
                        images, times = [], []
                if self._stop.is_set():
                    raise _Stopped
            except (_Stopped, _SinkFailed):
                raise
            except Exception as exc:  # decode / source error: deliver what came before it, then fail
                if self._stop.is_set():
                    raise _Stopped from exc  # an error caused by stop() closing the source
                self._fail(exc, "source")
                if images:
                    self._send(images, times)
                    images, times = [], []
                self._drain_in_flight()
                self._end(SourceState.FAILED)
                return False
            finally:
                source.close()
            if images:
                self._send(images, times)
                images, times = [], []
            self._drain_in_flight()
            self._end(SourceState.FINISHED)
        except _Stopped:
            self._count_dropped(len(images))
            self._end(SourceState.STOPPED)
        except _SinkFailed as exc:
            self._count_dropped(len(images))
            self._fail(exc.cause, "sink")
            self._end(SourceState.FAILED)
            return exc.for_good
        except Exception as exc:  # opening failed, or anything unexpected: never kill the actor
            self._count_dropped(len(images))
            if self._stop.is_set() and self._last_error is None:
                self._end(SourceState.STOPPED)
            else:
                self._fail(exc, "source")
                self._end(SourceState.FAILED)
        finally:
            if self._push is not None:
                self._push.abort("decoding ended")
        return False

    def _send(self, images: list[np.ndarray], times: list[float]) -> None:
        """Send one chunk through the window, applying the backpressure policy."""
        self._reap()
        if self._window_full():
            if self._policy == "drop":
                self._count_dropped(len(images), chunk=True)
                return
            while self._window_full():
                if self._stop.is_set():
                    raise _Stopped  # the caller counts the chunk as dropped
                self._wait_a_while()
        stamps = np.asarray(times, dtype=np.float64) + self._time_offset
        with self._lock:
            self._submit(self._chunks_sent, np.stack(images), stamps)
            self._frame_shape = images[0].shape[:2]
            self._frames_sent += len(images)
            self._chunks_sent += 1

    def _submit(self, seq: int, frames: np.ndarray, times: np.ndarray) -> None:
        """One ingest call (under self._lock: resync submits too)."""
        ref = self._sink.ingest.remote(self.stream_id, frames, times, seq=seq)
        self._pending[ref] = (seq, frames, times)
        self._max_seen_in_flight = max(self._max_seen_in_flight, len(self._pending))

    def _window_full(self) -> bool:
        with self._lock:
            return self._sink_lost is not None or len(self._pending) >= self._max_in_flight

    def _wait_a_while(self) -> None:
        """Until a sink call finishes (or _POLL_S), then collect finished calls."""
        with self._lock:
            pending = list(self._pending)
        if pending:
            ray.wait(pending, num_returns=1, timeout=_POLL_S)
        else:  # waiting for a resync
            time.sleep(_POLL_S)
        self._reap()

    def _reap(self) -> None:
        """Collect finished sink calls; raise _SinkFailed for the first that failed (a call lost
        with the sink's process keeps its chunk for resync, unless reconnect_s has passed)."""
        with self._lock:
            pending = list(self._pending)
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=0) if pending else ([], [])
        failure = None
        for ref in ready:
            try:
                ray.get(ref)
                error = None
            except Exception as exc:  # RayTaskError (sink raised) or RayActorError (sink died)
                error = exc
            with self._lock:
                chunk = self._pending.pop(ref, None)
                if chunk is None:  # resync sent it again meanwhile
                    continue
                seq, frames, times = chunk
                if error is None:
                    self._frames_delivered += len(frames)
                elif self._reconnect_s and isinstance(error, SINK_LOST):
                    self._unacked[seq] = (frames, times)
                    self._sink_lost = self._sink_lost or (time.monotonic(), error)
                else:
                    failure = failure or error
        if failure is not None:
            raise _SinkFailed(failure)
        lost = self._sink_lost
        if lost is not None and time.monotonic() - lost[0] > self._reconnect_s:
            raise _SinkFailed(lost[1], for_good=True)

    def _drain_in_flight(self) -> None:
        while True:
            with self._lock:
                if not (self._pending or self._unacked or self._sink_lost):
                    return
            if self._stop.is_set():
                raise _Stopped
            self._wait_a_while()

    def _count_dropped(self, n: int, chunk: bool = False) -> None:
        if n:
            with self._lock:
                self._frames_dropped += n
                self._chunks_dropped += int(chunk)

    def _fail(self, exc: BaseException, where: str) -> None:
        with self._lock:
            if self._last_error is None:  # keep the first cause
                self._last_error = _error_info(exc, where)
        log.warning("stream %s: %s error: %s", self.stream_id, where, self._last_error)

    def _end(self, state: SourceState) -> None:
        with self._lock:
            if not self._state.terminal:
                self._state = state
                self._ended_at = time.time()
        self._done.set()


DecoderActor = ray.remote(
    num_cpus=0.05,
    max_restarts=0,
    max_concurrency=4,  # default group: start, status, stop
    concurrency_groups={"push": 2, "wait": 8},
)(StreamDecoder)
