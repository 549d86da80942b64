"""Decode video sources into sampled RGB frames: files, bytes, HTTP(S), RTSP and pushed chunks.

Pure Python + PyAV, no Ray: a frame-decoder actor hosts one `FrameSource` per stream.

Time model. `DecodedFrame.time` is the decoder's `frame.time` (seconds, from pts and the stream time
base, never raw pts) moved so the first frame of the source is at 0.0. Times are kept strictly
increasing: a frame without a time, or whose time does not move forward (a timestamp restart,
e.g. an encoder restart in a live MPEG-TS), is placed one frame interval (1 / stream rate) after
the previous frame, and later frames keep that shift. Forward jumps (gaps) are kept as they are.
A frame less than `_LATE_FRAMES` frame intervals before the previous one is not a restart but a
frame the decoder put out of order (its reordering is confused after damaged packets): it is
dropped and counted (`late_frames`), so the frames after it keep their own times.

Sampling. With `fps` set, the sampling instants are k / fps (k = 0, 1, ...). A frame is kept when
its time reaches the next instant, with a tolerance of half a source frame interval so that
rounded container timestamps (Matroska stores milliseconds) still match. After a kept frame, the
next instant is the first one after it: a frame is never used for two instants, no two frames are
kept for one instant, and a gap in the stream does not cause a burst of catch-up frames.

Reconnects (network sources with `reconnect=True`). A failed open or a dropped connection is
retried after `backoff_s`, doubling up to `max_backoff_s`, for at most `max_retries` attempts in a
row (the count resets once a new frame arrives); then the error is raised, as
`SourceUnavailableError` for transport failures. A resource of known size or duration (an HTTP
file) is resumed: frames up to the last one already decoded are skipped, so none is repeated. A
live stream (RTSP, unbounded HTTP) is continued: its new frames are placed one frame interval after
the last one. For live streams an end of stream also counts as a drop, since they do not end on
their own. Files, bytes and pushed streams are never retried.

Damage. A packet the codec cannot decode (corrupt or cut bytes in the middle of a file or a live
stream) is skipped and counted (`packets_skipped`); decoding goes on with the next one, as FFmpeg's
own tools do. Only `max_bad_packets` undecodable packets in a row (nothing decodes any more) fail
the source. A container error (the demuxer cannot go on) still ends it, as below.

Errors. Frames decoded before a failure are all yielded (the decoder is drained) before the typed
error is raised; messages name the source (URL credentials are masked).
"""

from __future__ import annotations

import io
import logging
import math
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import av
import numpy as np

from pipeline.errors import (
    ConfigError,
    InvalidInputError,
    SourceRefusedError,
    SourceUnavailableError,
    StreamKVError,
    VideoDecodeError,
)
from pipeline.push_buffer import PushBuffer, PushReader, push_target
from pipeline.rtsp_guard import RtspGuard
from pipeline.source_guard import SourceGuard, cap_exceeded
from pipeline.source_policy import SourcePolicy

log = logging.getLogger(__name__)

# Protocols FFmpeg may open for each kind of source, nested opens included: a playlist or a crafted
# container must not make the decoder read local files or other hosts' services.
_PROTOCOLS = {
    "http": "http,https,tcp,tls,crypto,httpproxy",
    "https": "http,https,tcp,tls,crypto,httpproxy",
    "rtsp": "rtsp,rtsps,rtp,srtp,tcp,udp,tls,crypto,httpproxy",
    "rtsps": "rtsp,rtsps,rtp,srtp,tcp,udp,tls,crypto,httpproxy",
    "file": "file,crypto",
    "memory": "none",
}
# Demuxers accepted as video containers. FFmpeg also "decodes" text files (tty: ANSI art), single
# images and more; those are not videos for our purposes.
VIDEO_CONTAINERS = frozenset(
    "mov mp4 matroska webm mpegts mpeg avi flv asf ogg ivf nut mxf h264 hevc m4v obu mjpeg mpjpeg gif "
    "yuv4mpegpipe hls dash rtsp".split()
)
_NETWORK = ("http", "https", "rtsp", "rtsps")
_FALLBACK_RATE = 25.0  # FFmpeg's own assumption when a stream declares no frame rate
_LATE_FRAMES = 16  # H.264's deepest frame reordering (DPB size), in frames


@dataclass(frozen=True)
class DecodeConfig:
    """How to decode and sample a source (times in seconds).

    fps: sampling rate; None keeps every decoded frame.  size: (height, width) to resize to; None
    keeps the source size; with shrink_only, a frame no larger than size in both sides keeps its
    own (the model's processor resizes it as before).  max_frames: stop after emitting this many.  reconnect: retry dropped
    network sources.  max_retries: failed attempts in a row before giving up.  backoff_s: first
    wait between attempts, doubled each time up to max_backoff_s.  open_timeout_s: connecting and
    probing a network source.  read_timeout_s: waiting for more data from a network or pushed
    source (pushed: from the first byte on).  None disables a timeout.  probe_s: how much of a
    network or pushed stream FFmpeg reads to learn its format before the first frame: its own
    default (5 s, or 20 frames to estimate a frame rate) holds a live stream's first frames back
    until that much video has arrived (pushed: been uploaded). Such streams estimate no frame
    rate either: they take the codec's declared one.  max_bad_packets: undecodable packets in a
    row that fail the source (fewer are skipped; module docstring).  max_whole_upload_bytes:
    pushed MP4 whose index (moov) follows its media can only be decoded whole, once closed: the
    most bytes buffered for that (`pipeline.upload_format`).  source_policy: the SSRF guard for
    network sources (pipeline/source_policy.py); None (the CLI's trusted sources) fetches anything.
    """

    fps: float | None = None
    size: tuple[int, int] | None = None
    shrink_only: bool = False
    max_frames: int | None = None
    reconnect: bool = True
    max_retries: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    open_timeout_s: float | None = 10.0
    read_timeout_s: float | None = 10.0
    probe_s: float = 0.5
    max_bad_packets: int = 50
    max_whole_upload_bytes: int = 512 * 2**20
    source_policy: SourcePolicy | None = None

    def __post_init__(self) -> None:
        if self.fps is not None and not self.fps > 0:
            raise ConfigError(f"fps must be > 0 or None, got {self.fps}")
        if self.size is not None and (len(self.size) != 2 or any(int(v) != v or v < 1 for v in self.size)):
            raise ConfigError(f"size must be (height, width) of positive ints or None, got {self.size}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ConfigError(f"max_frames must be >= 1 or None, got {self.max_frames}")
        if self.max_retries < 0 or self.backoff_s < 0 or self.max_backoff_s < self.backoff_s:
            raise ConfigError("need max_retries >= 0 and 0 <= backoff_s <= max_backoff_s")
        if self.max_bad_packets < 1 or self.max_whole_upload_bytes < 1:
            raise ConfigError("need max_bad_packets >= 1 and max_whole_upload_bytes >= 1")
        if not self.probe_s > 0:
            raise ConfigError(f"probe_s must be > 0, got {self.probe_s}")
        for name in ("open_timeout_s", "read_timeout_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be > 0 or None, got {value}")


@dataclass(frozen=True, eq=False)
class DecodedFrame:
    """One sampled frame: `image` is [H, W, 3] uint8 RGB, C-contiguous, writable and owned by the
    caller; `time` is seconds since the first frame (see the module docstring); `index` counts the
    emitted frames of the source from 0."""

    image: np.ndarray
    time: float
    index: int


@dataclass(frozen=True)
class StreamInfo:
    """What the container says about the decoded video stream (before any resize)."""

    width: int
    height: int
    fps: float | None  # frame rate (FFmpeg's best guess), None when not declared
    duration: float | None  # seconds, None for live or unknown
    codec: str


class _Clock:
    """Maps decoder frame times to the source's strictly increasing time line (module docstring)."""

    def __init__(self) -> None:
        self._offset: float | None = None
        self._last: float | None = None
        self._last_raw: float | None = None
        self._skip_through: float | None = None
        self._rebase = False
        self.late = 0  # frames dropped as out of order (module docstring)

    def stamp(self, raw: float | None, interval: float) -> float | None:
        """The time of a frame with decoder time `raw`, or None for a frame already seen before a
        resumed reconnect, or put out of order by the decoder."""
        if raw is None or not math.isfinite(raw):
            t = 0.0 if self._last is None else self._last + interval
        else:
            if self._skip_through is not None:
                if raw <= self._skip_through + 1e-6:
                    return None
                self._skip_through = None
            if self._offset is None or self._rebase:
                self._offset = (0.0 if self._last is None else self._last + interval) - raw
                self._rebase = False
            t = raw + self._offset
            if self._last is not None and self._last - _LATE_FRAMES * interval < t < self._last - 1e-6:
                self.late += 1
                return None
            if self._last is not None and t <= self._last:  # time went back or stood still
                self._offset += self._last + interval - t
                t = self._last + interval
            self._last_raw = raw
        self._last = t
        return t

    def resume(self) -> None:
        """The source restarts from its beginning on the same time line: skip what was seen."""
        self._skip_through = self._last_raw

    def restart(self) -> None:
        """The source continues on a new time line: place its next frame after the last one."""
        self._rebase = True


class _Sampler:
    """Decides which frames to keep for a target rate (module docstring)."""

    def __init__(self, fps: float | None) -> None:
        self._fps = fps
        self._next = 0  # index k of the next sampling instant k / fps

    def take(self, t: float, tolerance: float) -> bool:
        if self._fps is None:
            return True
        if t < self._next / self._fps - tolerance:
            return False
        self._next = math.floor((t + tolerance) * self._fps) + 1
        return True


class _Closed(Exception):
    """close() was called while waiting to reconnect."""


class FrameSource:
    """An iterator of `DecodedFrame` over one source; a closeable context manager.

    `frames_decoded` counts distinct source frames decoded so far, `frames_emitted` the sampled
    frames handed out, `packets_skipped` the undecodable packets skipped and `late_frames` the
    frames dropped as put out of order after them (module docstring), `stream_info` describes the stream (None until the source is opened).
    `close()` may be called from another thread: a pushed source stops at once, a network source
    at its next frame or read timeout.
    """

    def __init__(self, source: str | Path | bytes | PushBuffer, config: DecodeConfig, fmt: str | None) -> None:
        self.config = config
        self.frames_decoded = 0
        self.frames_emitted = 0
        self.packets_skipped = 0
        self._bad_in_a_row = 0
        self.stream_info: StreamInfo | None = None
        self._format = fmt
        self._push = source if isinstance(source, PushBuffer) else None
        self._kind, self._target, self.name = _classify(source)
        self._container: av.container.InputContainer | None = None
        self._reader: PushReader | io.BytesIO | None = None  # what FFmpeg reads a pushed stream from
        self._stream: av.VideoStream | None = None
        self._interval = 1 / _FALLBACK_RATE
        self._bounded = True
        self._sessions = 0
        self._failures = 0
        self._clock = _Clock()
        self._sampler = _Sampler(config.fps)
        self._stop = threading.Event()
        self._guard: SourceGuard | None = None  # the SSRF guard's proxy or relay (network sources with a policy)
        self._demuxed_bytes = 0  # packet bytes of a guarded source, counted against its caps as well
        self._opened_at: float | None = None  # time.monotonic() of its first open (caps, reconnects included)
        self._frames = self._run()

    def __iter__(self) -> FrameSource:
        return self

    def __next__(self) -> DecodedFrame:
        try:
            return next(self._frames)
        except ValueError:  # "generator already executing": close() from another thread won the race
            if self._stop.is_set():
                raise StopIteration from None
            raise

    @property
    def late_frames(self) -> int:
        return self._clock.late

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._push is not None:
            self._push.abort("frame source closed")
        try:
            self._frames.close()
        except ValueError:  # being iterated by another thread, which closes the container itself
            return
        self._close_container()
        if self._guard is not None:
            self._guard.close()

    def _open_with_retries(self) -> None:
        while True:
            try:
                return self._open_container()
            except (av.FFmpegError, StreamKVError) as exc:
                self._retry_or_raise(exc)

    def _run(self) -> Generator[DecodedFrame, None, None]:
        try:
            while True:
                if self._container is None:
                    self._open_with_retries()
                try:
                    done = yield from self._decode_session()
                    if self._guard is not None and self._guard.refused:  # cut off by the guard, not ended
                        raise SourceRefusedError(self._guard.refused)
                    if done or not self._end_is_drop():
                        return
                    failure: Exception = SourceUnavailableError(f"{self.name}: live stream ended")
                except (av.FFmpegError, StreamKVError) as exc:
                    failure = exc
                self._close_container()
                self._retry_or_raise(failure)
        except _Closed:
            return
        finally:
            self._close_container()
            if self._push is not None:
                self._push.abort("decoding stopped")

    def _decode_session(self) -> Generator[DecodedFrame, None, bool]:
        """Emit the sampled frames of the open container; True once max_frames is reached."""
        for frame in self._decoded_frames():
            if self._stop.is_set():
                return True
            t = self._clock.stamp(frame.time, self._interval)
            if t is None:
                continue
            self.frames_decoded += 1
            self._failures = 0
            if self._sampler.take(t, self._interval / 2):
                out = DecodedFrame(self._to_rgb(frame), t, self.frames_emitted)
                self.frames_emitted += 1
                yield out
                if self.config.max_frames is not None and self.frames_emitted >= self.config.max_frames:
                    return True
        return False

    def _decoded_frames(self) -> Iterator[av.VideoFrame]:
        """All frames of the open container. On an error the decoder is drained first, so the
        frames it already holds (reordering delay) are not lost, then the error is raised."""
        packets = 0
        try:
            for packet in self._container.demux(self._stream):
                packets += packet.size > 0
                self._check_caps(packet.size)
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError as exc:
                    self._skip_packet(packet, exc)
                    continue
                self._bad_in_a_row = 0 if frames else self._bad_in_a_row
                yield from frames
        except (av.FFmpegError, StreamKVError):
            try:
                held = self._stream.codec_context.decode(None)
            except av.FFmpegError:
                held = []
            for frame in held:
                frame.time_base = self._stream.time_base  # frames drained without a packet have none
                yield frame
            raise
        # A pushed stream whose demuxer stopped before the end of the upload met a box or header
        # it could not parse (fragmented MP4 has no resync point): say so rather than end quietly.
        reader = self._reader
        if isinstance(reader, PushReader) and not reader.at_end and not self._stop.is_set():
            raise VideoDecodeError(f"{self.name}: the container stopped at byte {reader.position}, before the end "
                                   "of the upload (damaged data); the frames after it are lost")
        # MP4 cut inside its sample data can end without an error: its index says what is missing.
        if 0 < packets < self._stream.frames:
            raise VideoDecodeError(f"{self.name}: truncated, {packets} of {self._stream.frames} packets present")

    def _check_caps(self, nbytes: int) -> None:
        """The policy's byte and time caps in the decode loop, behind the proxies' own count."""
        if self._guard is not None:
            self._demuxed_bytes += nbytes
            reason = cap_exceeded(self.config.source_policy, self._demuxed_bytes, self._opened_at)
            if reason:
                raise SourceRefusedError(f"{self.name}: {reason}")

    def _skip_packet(self, packet: av.Packet, exc: av.FFmpegError) -> None:
        """Count an undecodable packet and go on, unless too many came in a row (module docstring)."""
        self.packets_skipped += 1
        self._bad_in_a_row += 1
        at = f"{float(packet.pts * packet.time_base):.3f} s" if packet.pts is not None and packet.time_base else "?"
        if self._bad_in_a_row > self.config.max_bad_packets:
            raise VideoDecodeError(f"{self.name}: {self._bad_in_a_row} packets in a row could not be decoded "
                                   f"(last at {at}: {_describe(exc)})")
        log.warning("%s: skipped an undecodable packet at %s (%s)", self.name, at, _describe(exc))

    def _open_container(self) -> None:
        if self._stop.is_set():
            raise _Closed
        cfg = self.config
        options = {"protocol_whitelist": _PROTOCOLS[self._kind]}
        timeout = None
        if self._kind in _NETWORK or self._push is not None:
            options["analyzeduration"] = str(int(cfg.probe_s * 1e6))  # microseconds
            # no frames read to estimate the rate (a 1 fps stream would wait for several): the
            # codec's declared rate is used instead (below)
            options["fpsprobesize"] = "0"
        if self._kind in _NETWORK:
            timeout = (cfg.open_timeout_s, cfg.read_timeout_s)
            if self._kind.startswith("rtsp"):
                options["rtsp_transport"] = "tcp"
                if cfg.read_timeout_s is not None:
                    options["timeout"] = str(int(cfg.read_timeout_s * 1e6))  # socket I/O, microseconds
        target = self._target
        if cfg.source_policy is not None and self._kind in _NETWORK:  # checked at every (re)connection
            if self._kind.startswith("rtsp"):
                self._guard = self._guard or RtspGuard(cfg.source_policy, target)
                target = self._guard.url
            else:
                self._guard = self._guard or SourceGuard(cfg.source_policy)
                options["http_proxy"] = self._guard.url
            self._opened_at = self._opened_at or time.monotonic()
            self._check_caps(0)
        if self._push is not None:
            target = self._reader = push_target(PushReader(self._push, cfg.read_timeout_s), cfg.max_whole_upload_bytes,
                                                self.name)
        elif isinstance(target, bytes):
            target = io.BytesIO(target)
        try:
            container = av.open(target, "r", format=self._format, options=options, timeout=timeout)
        except av.FFmpegError:
            if isinstance(self._guard, RtspGuard) and self._guard.unreachable:  # not "invalid data": retried
                raise SourceUnavailableError(f"{self.name}: {self._guard.unreachable}") from None
            raise
        problem = None
        if VIDEO_CONTAINERS.isdisjoint(container.format.name.split(",")):
            problem = f"not a video container (FFmpeg reads it as {container.format.name!r})"
        elif not container.streams.video:
            problem = "no video stream"
        if problem:
            container.close()
            raise VideoDecodeError(f"{self.name}: {problem}")
        stream = container.streams.video[0]
        self._container, self._stream = container, stream
        if stream.average_rate:  # FFmpeg measured the rate
            rate = stream.guessed_rate or stream.average_rate
        else:  # not estimated (fpsprobesize=0): FFmpeg's guess is then twice the rate (H.264)
            rate = stream.codec_context.framerate or stream.guessed_rate or stream.base_rate
        self._interval = 1 / float(rate) if rate else 1 / _FALLBACK_RATE
        self._bounded = container.duration is not None or container.size > 0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        else:
            duration = container.duration / av.time_base if container.duration is not None else None
        ctx = stream.codec_context
        self.stream_info = StreamInfo(ctx.width, ctx.height, float(rate) if rate else None, duration, ctx.name)
        if self._sessions:
            self._clock.resume() if self._bounded else self._clock.restart()
        self._sessions += 1

    def _close_container(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = self._stream = None

    def _end_is_drop(self) -> bool:
        return self._kind in _NETWORK and self.config.reconnect and not self._bounded

    def _retry_or_raise(self, exc: Exception) -> None:
        """Wait before the next attempt, or raise the typed error when no retry is allowed."""
        if not self._retryable(exc):
            raise self._typed(exc)
        cfg = self.config
        if self._failures >= cfg.max_retries:
            raise self._typed(exc, retries=self._failures)
        delay = min(cfg.backoff_s * 2**self._failures, cfg.max_backoff_s)
        self._failures += 1
        log.warning("%s: %s; retry %d/%d in %.2f s", self.name, _describe(exc), self._failures, cfg.max_retries, delay)
        if self._stop.wait(delay):
            raise _Closed

    def _retryable(self, exc: Exception) -> bool:
        if isinstance(exc, SourceRefusedError) or (self._guard is not None and self._guard.refused):
            return False
        if self._kind not in _NETWORK or not self.config.reconnect:
            return False
        if isinstance(exc, (av.error.HTTPClientError, av.error.LookupError, VideoDecodeError)):
            return False  # a 4xx, a missing codec or protocol, no video stream: same answer next time
        if isinstance(exc, av.error.InvalidDataError):
            return self.frames_decoded > 0  # at first contact it means "not a video", later a cut transfer
        return True

    def _typed(self, exc: Exception, retries: int = 0) -> StreamKVError:
        if self._guard is not None and self._guard.refused:
            return SourceRefusedError(f"{self.name}: {self._guard.refused}")
        if isinstance(exc, StreamKVError) and not retries:
            return exc
        transport = (OSError, EOFError, av.error.ExitError, av.error.HTTPError, av.error.HTTPClientError,
                     av.error.ProtocolNotFoundError, SourceUnavailableError)
        cls = SourceUnavailableError if isinstance(exc, transport) else VideoDecodeError
        message = _describe(exc) if isinstance(exc, StreamKVError) else f"{self.name}: {_describe(exc)}"
        if retries:
            message += f" (gave up after {retries} retries)"
        error = cls(message)
        error.__cause__ = exc
        return error

    def _to_rgb(self, frame: av.VideoFrame) -> np.ndarray:
        size = self.config.size
        if size is None or (self.config.shrink_only and frame.height <= size[0] and frame.width <= size[1]):
            image = frame.to_ndarray(format="rgb24")
        else:
            height, width = self.config.size
            image = frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="AREA")
        if not (image.flags.c_contiguous and image.flags.writeable):  # e.g. padded rows of odd widths
            image = np.array(image, order="C")
        return image


def open_source(
    source: str | Path | bytes | PushBuffer, config: DecodeConfig = DecodeConfig(), *, format: str | None = None
) -> FrameSource:
    """Open `source` for decoding: a local path, an `http(s)://` or `rtsp(s)://` URL, the bytes of
    a whole video, or a `PushBuffer` fed by another thread. `format` forces a demuxer ("mpegts",
    ...) where probing is not wanted.

    Every source except a PushBuffer is opened here, so a missing file, an unreachable URL (after
    the retries the config allows) or a file that is not a video raises at once. A PushBuffer's
    bytes usually arrive later, so it is opened by the first `next()`, in the consuming thread.
    """
    frames = FrameSource(source, config, format)
    if frames._push is None:
        try:
            frames._open_with_retries()
        except BaseException:
            frames.close()
            raise
    return frames


def _classify(source: object) -> tuple[str, str | bytes | None, str]:
    """(kind, what to hand FFmpeg, name for messages) of a source; kind keys `_PROTOCOLS`."""
    if isinstance(source, PushBuffer):
        return "memory", None, "<push stream>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return "memory", data, f"<{len(data)} bytes>"
    if isinstance(source, Path) or (isinstance(source, str) and "://" not in source):
        path = Path(source).expanduser().absolute()
        return "file", f"file:{path}", str(source)
    if isinstance(source, str):
        parts = urlsplit(source)
        scheme = parts.scheme.lower()
        if scheme not in _NETWORK:
            raise InvalidInputError(f"unsupported URL scheme {scheme!r} in {_mask(source)}")
        return scheme, source, _mask(source)
    raise InvalidInputError(f"unsupported video source type {type(source).__name__}")


def _mask(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, av.error.ExitError):
        return "timed out"
    if isinstance(exc, av.FFmpegError):
        detail = f" ({exc.log[2].strip()})" if exc.log else ""
        return f"{exc.strerror}{detail}"
    return str(exc)
