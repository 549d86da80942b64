"""The sink side of a StreamDecoder: its chunks delivered to the FrameSink through a window of
in-flight calls, the backpressure policies, and the chunks sent again (`resync`) to a sink that
restarted. `SinkWindow` is mixed into `StreamDecoder` (actors/decoder.py) and works on its state
(set in its __init__: the lock, the counters, `_pending`, `_unacked`, `_sink_lost`).

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

A sink that restarts (a named coordinator, which Ray restarts when its process dies): with
`reconnect_s` > 0, a sink call lost with the sink's process does not fail the stream. The decoder
keeps the chunks such calls carried and sends nothing new (policy "drop" drops, "block" waits)
until the restarted sink calls `resync()`, which sends them again, with their own `seq`, before
anything newer; the sink skips the frames of theirs it had already consumed (by time). After
`reconnect_s` without a resync the stream fails (see actors/decoder.py), and the actor ends
itself: nothing is left to own it (it is detached, to outlive the sink's process).
"""

from __future__ import annotations

import time
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

Policy = Literal["block", "drop"]
POLICIES = ("block", "drop")
_POLL_S = 0.1  # how often a blocked decode thread re-checks stop()

# a sink call lost with the sink's process (a restarting sink may take it over: see resync)
SINK_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)

__all__ = ["FrameSink", "SinkWindow", "Policy", "POLICIES", "SinkFailed", "DecodeStopped"]


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


class SinkFailed(Exception):
    def __init__(self, cause: BaseException, for_good: bool = False) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.for_good = for_good  # the sink's process was lost and no restarted one took over


class DecodeStopped(Exception):
    pass


class SinkWindow:
    """Delivery of a StreamDecoder's chunks to its sink (see the module docstring)."""

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

    def _send(self, images: list[np.ndarray], times: list[float]) -> None:
        """Send one chunk through the window, applying the backpressure policy."""
        self._reap()
        if self._window_full():
            if self._policy == "drop":
                self._count_dropped(len(images), chunk=True)
                return
            while self._window_full():
                if self._stop.is_set():
                    raise DecodeStopped  # the caller counts the chunk as dropped
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
        """Collect finished sink calls; raise SinkFailed for the first that failed (a call lost
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
            raise SinkFailed(failure)
        lost = self._sink_lost
        if lost is not None and time.monotonic() - lost[0] > self._reconnect_s:
            raise SinkFailed(lost[1], for_good=True)

    def _drain_in_flight(self) -> None:
        while True:
            with self._lock:
                if not (self._pending or self._unacked or self._sink_lost):
                    return
            if self._stop.is_set():
                raise DecodeStopped
            self._wait_a_while()
