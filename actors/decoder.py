"""StreamDecoder: decodes ONE video stream with PyAV and feeds its frames, in chunks, to a sink actor.

    from actors.decoder_actor import DecoderActor  # a StreamDecoder as a Ray actor

    sink = MySink.remote()                       # implements the FrameSink contract (actors/decoder_sink.py)
    dec = DecoderActor.remote("cam-1", "rtsp://...", DecodeConfig(fps=2), sink,
                              chunk_frames=8, max_in_flight=2, policy="drop")
    dec.start.remote()
    ray.get(dec.status.remote())                 # answers at once, even while decoding
    ray.get(dec.wait.remote(timeout_s=60))       # status once finished / failed / stopped

Push mode (`source=None`): the owner feeds the container bytes (MPEG-TS, Matroska/WebM,
fragmented MP4: streamable formats) with `push(chunk, seq)` and ends them with `close()`.

Failures. A decode/source error (`VideoDecodeError`, `SourceUnavailableError`, ...) first
delivers the frames decoded before it (the partial chunk is flushed, in-flight calls are
awaited), then ends the stream in state "failed" with `last_error`. A sink call that raises, or a
sink that dies, ends the stream in state "failed" at once (decoding stops; frames not sent count
as dropped). Neither crashes the actor process: `status()` keeps answering. Each stream has its
own actor, so one stream's failure never touches another's.

Files. This one holds the decoder's state, its control calls (start, stop, wait) and the decode
loop. The rest, one concern each, mixed into `StreamDecoder`: actors/decoder_sink.py (the
FrameSink contract; chunks, the in-flight window, backpressure policies, resync after a sink
restart), actors/decoder_push.py (push mode: `push`, `close`, seq ordering),
actors/decoder_status.py (`status()`, warnings, errors). actors/decoder_actor.py: `DecoderActor`,
one StreamDecoder as a Ray actor (threads, restarts); actors/decoder_host.py: many in a process.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import ray

from actors.decoder_push import PushOrder
from actors.decoder_sink import POLICIES, DecodeStopped, Policy, SinkFailed, SinkWindow
from actors.decoder_status import DecoderStatus
from actors.messages import SourceState
from pipeline.decode import DecodeConfig, FrameSource, PushBuffer, open_source
from pipeline.errors import ConfigError, InvalidInputError

log = logging.getLogger(__name__)

__all__ = ["StreamDecoder"]


class StreamDecoder(DecoderStatus, SinkWindow, PushOrder):
    """One stream's decoder; `DecoderActor` (actors/decoder_actor.py) is the Ray actor. See the
    module docstring, and those of the files it names.

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

        # push ordering (see push(), actors/decoder_push.py)
        self._init_push_order(first_seq, reorder_wait_s)

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

    @ray.method(concurrency_group="wait")
    def wait(self, timeout_s: float | None = None) -> dict:
        """Block until the stream has ended (finished, failed or stopped) or `timeout_s` passed;
        returns status()."""
        self._done.wait(timeout_s)
        return self.status()

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
                raise DecodeStopped
            try:
                for frame in source:
                    if self._stop.is_set():
                        raise DecodeStopped
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
                    raise DecodeStopped
            except (DecodeStopped, SinkFailed):
                raise
            except Exception as exc:  # decode / source error: deliver what came before it, then fail
                if self._stop.is_set():
                    raise DecodeStopped from exc  # an error caused by stop() closing the source
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
        except DecodeStopped:
            self._count_dropped(len(images))
            self._end(SourceState.STOPPED)
        except SinkFailed as exc:
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

    def _count_dropped(self, n: int, chunk: bool = False) -> None:
        if n:
            with self._lock:
                self._frames_dropped += n
                self._chunks_dropped += int(chunk)

    def _end(self, state: SourceState) -> None:
        with self._lock:
            if not self._state.terminal:
                self._state = state
                self._ended_at = time.time()
        self._done.set()
