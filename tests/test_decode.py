"""Decoding real videos (encoded here with PyAV) from files, bytes, pushed chunks and a loopback HTTP
server, including the failures: truncation, garbage, missing sources, dropped connections."""

from __future__ import annotations

import collections
import contextlib
import io
import socket
import threading
import time
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import av
import numpy as np
import pytest

from pipeline.decode import DecodeConfig, FrameSource, PushBuffer, open_source
from pipeline.errors import (
    ConfigError,
    InvalidInputError,
    PushBufferTimeout,
    SourceUnavailableError,
    VideoDecodeError,
)
from pipeline.video_io import FRAGMENTED_MP4_OPTIONS, write_video

FPS = 30
T = 90  # 3 s at 30 fps
H, W = 48, 64
FAST_RETRY = dict(max_retries=2, backoff_s=0.02, max_backoff_s=0.1, open_timeout_s=5, read_timeout_s=5)


def clip_frames(n: int = T, h: int = H, w: int = W) -> np.ndarray:
    """Solid frames whose colour encodes the frame index modulo 32 (red = 8 * i)."""
    red = (np.arange(n) * 8) % 256
    frames = np.empty((n, h, w, 3), np.uint8)
    frames[..., 0] = red[:, None, None]
    frames[..., 1] = 255 - red[:, None, None]
    frames[..., 2] = 128
    return frames


def index_of(image: np.ndarray) -> int:
    """Frame index modulo 32, read back from the colour of a clip_frames frame."""
    return int(round(float(image[..., 0].mean()) / 8)) % 32


def encode(frames: np.ndarray, container_format: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    write_video(buf, frames, FPS, container_format=container_format, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def mp4_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("clips") / "clip.mp4"
    write_video(path, clip_frames(), FPS)
    return path


@pytest.fixture(scope="module")
def ts_bytes():
    return encode(clip_frames(), "mpegts")


def times(frames) -> list[float]:
    return [f.time for f in frames]


# --- round trip, sampling, resize ---------------------------------------------------------------


def test_solid_colours_round_trip(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 30, 90), (128, 128, 128), (10, 240, 200)]
    frames = np.repeat(np.array(colours, np.uint8), 5, axis=0)[:, None, None, :] * np.ones((1, H, W, 1), np.uint8)
    write_video(tmp_path / "solid.mp4", frames, FPS)
    with open_source(tmp_path / "solid.mp4") as src:
        decoded = list(src)
    assert len(decoded) == len(frames)
    for got, want in zip(decoded, frames):
        diff = np.abs(got.image.astype(int) - want.astype(int))
        assert diff.mean() < 3 and diff.max() <= 8, (want[0, 0], got.image[0, 0])


@pytest.mark.parametrize(
    "fps, expected_indices",
    [
        (None, list(range(T))),
        (30, list(range(T))),
        (2, list(range(0, T, 15))),
        (0.5, [0, 60]),
        (7, [0, 4, 9, 13, 17, 21, 26, 30, 34, 39, 43, 47, 51, 56, 60, 64, 69, 73, 77, 81, 86]),
    ],
)
def test_sampling_picks_exact_frame_times(mp4_path, fps, expected_indices):
    with open_source(mp4_path, DecodeConfig(fps=fps)) as src:
        frames = list(src)
        assert src.frames_decoded == T and src.frames_emitted == len(expected_indices)
    assert times(frames) == pytest.approx([i / FPS for i in expected_indices], abs=1e-6)
    assert [f.index for f in frames] == list(range(len(expected_indices)))
    assert [index_of(f.image) for f in frames] == [i % 32 for i in expected_indices]


def test_sampling_tolerates_millisecond_timestamps():
    """Matroska rounds times to ms (1/30 s -> 0.033): sampling at the source rate keeps every frame."""
    data = encode(clip_frames(), "matroska")
    assert len(list(open_source(data, DecodeConfig(fps=30)))) == T
    assert times(open_source(data, DecodeConfig(fps=2))) == pytest.approx([0, 0.5, 1, 1.5, 2, 2.5], abs=2e-3)


def test_frames_without_timestamps_get_times_from_the_stream_rate():
    data = encode(clip_frames(), "h264")  # raw elementary stream: decoded frames have no time
    with av.open(io.BytesIO(data)) as container:
        assert next(container.decode(video=0)).time is None
    frames = list(open_source(data, DecodeConfig(fps=2)))
    assert times(frames) == pytest.approx([0, 0.5, 1, 1.5, 2, 2.5], abs=1e-6)
    assert [index_of(f.image) for f in frames] == [i % 32 for i in range(0, T, 15)]


def test_times_that_jump_back_stay_increasing():
    """Two MPEG-TS clips back to back: the second restarts its timestamps, as a restarted encoder does."""
    one = encode(clip_frames(30), "mpegts")
    frames = list(open_source(one + one))
    assert times(frames) == pytest.approx([i / FPS for i in range(60)], abs=1e-6)
    assert [index_of(f.image) for f in frames] == [i % 30 for i in range(60)]


def test_gap_in_timestamps_does_not_emit_a_burst(tmp_path):
    path = tmp_path / "gap.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for i, pts in enumerate([*range(20), *range(60, 90)]):
            frame = av.VideoFrame.from_ndarray(clip_frames(1)[0], format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, FPS)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    # instants 1.0 and 1.5 fall in the gap: the frame at 2.0 serves instant 2.0 only, then 2.5
    assert times(open_source(path, DecodeConfig(fps=2))) == pytest.approx([0, 0.5, 2.0, 2.5], abs=1e-6)


@pytest.mark.parametrize("size", [(24, 32), (33, 17), (96, 128)])
def test_resize(mp4_path, size):
    frames = list(open_source(mp4_path, DecodeConfig(size=size, max_frames=3)))
    for f in frames:
        assert f.image.shape == (*size, 3) and f.image.dtype == np.uint8
        assert f.image.flags.c_contiguous and f.image.flags.writeable
    assert [index_of(f.image) for f in frames] == [0, 1, 2]


def test_max_frames_stops_decoding(mp4_path):
    with open_source(mp4_path, DecodeConfig(fps=2, max_frames=5)) as src:
        frames = list(src)
        assert len(frames) == 5 and frames[-1].time == pytest.approx(2.0)
        assert src.frames_emitted == 5 and src.frames_decoded == 61  # stopped right after frame 60


def test_frames_are_owned_arrays_and_stream_info(mp4_path):
    with open_source(mp4_path, DecodeConfig(max_frames=2)) as src:
        info = src.stream_info
        first, second = list(src)
    assert (info.width, info.height, info.codec) == (W, H, "h264")
    assert info.fps == pytest.approx(FPS) and info.duration == pytest.approx(3.0, abs=0.05)
    first.image[:] = 0  # writable, and shares nothing with the next frame
    assert second.image.mean() > 50


# --- odd sizes ----------------------------------------------------------------------------------


def test_odd_size_yuv420p_is_padded_by_repeating_the_edge(tmp_path):
    frames = np.zeros((4, 47, 65, 3), np.uint8)
    frames[..., 0] = np.linspace(0, 255, 65, dtype=np.uint8)  # a horizontal ramp
    write_video(tmp_path / "odd.mp4", frames, FPS)
    decoded = list(open_source(tmp_path / "odd.mp4"))
    assert decoded[0].image.shape == (48, 66, 3)
    assert np.abs(decoded[0].image[:47, :65, 0].astype(int) - frames[0, ..., 0]).mean() < 4
    assert np.abs(decoded[0].image[:, 65, 0].astype(int) - 255).max() <= 8  # padding repeats the edge


def test_odd_size_kept_exactly_with_yuv444p(tmp_path):
    write_video(tmp_path / "odd.mkv", clip_frames(6, 47, 65), FPS, pix_fmt="yuv444p")
    with open_source(tmp_path / "odd.mkv") as src:
        frames = list(src)
        assert (src.stream_info.height, src.stream_info.width) == (47, 65)
    assert frames[0].image.shape == (47, 65, 3) and frames[0].image.flags.c_contiguous
    assert [index_of(f.image) for f in frames] == list(range(6))


def test_write_video_rejects_bad_input():
    with pytest.raises(InvalidInputError, match="container_format"):
        write_video(io.BytesIO(), clip_frames(2), FPS)
    with pytest.raises(InvalidInputError, match="uint8"):
        write_video(io.BytesIO(), clip_frames(2).astype(np.float32), FPS, container_format="mp4")
    with pytest.raises(InvalidInputError, match="no frames"):
        write_video(io.BytesIO(), [], FPS, container_format="mp4")
    with pytest.raises(InvalidInputError, match="shape"):
        write_video(io.BytesIO(), [clip_frames(1)[0], clip_frames(1, 32, 32)[0]], FPS, container_format="mp4")
    with pytest.raises(InvalidInputError, match="crf or bitrate"):
        write_video(io.BytesIO(), clip_frames(2), FPS, container_format="mp4", crf=20, bitrate=10**6)


def test_write_video_with_bitrate_and_iterable_frames():
    data = encode(iter(clip_frames(10)), "mp4", bitrate=2_000_000)
    assert [index_of(f.image) for f in open_source(data)] == list(range(10))


# --- failures of files and bytes -----------------------------------------------------------------


def test_truncated_file_yields_the_frames_before_the_cut(tmp_path, mp4_path):
    data = mp4_path.read_bytes()
    cut = len(data) // 2
    with av.open(str(mp4_path)) as container:
        stream = container.streams.video[0]
        whole = sorted(float(p.pts * p.time_base) for p in container.demux(stream) if p.size and p.pos + p.size <= cut)
    assert 10 < len(whole) < T
    (tmp_path / "cut.mp4").write_bytes(data[:cut])
    got = []
    with pytest.raises(VideoDecodeError, match="cut.mp4"):
        for frame in open_source(tmp_path / "cut.mp4"):
            got.append(frame)
    assert times(got) == pytest.approx(whole, abs=1e-6)
    assert [index_of(f.image) for f in got] == [round(t * FPS) % 32 for t in whole]


def test_mp4_cut_before_its_index_is_not_a_video(tmp_path):
    data = encode(clip_frames(), "mp4")  # written to a file object: index (moov) at the end
    start = time.monotonic()
    with pytest.raises(VideoDecodeError):
        open_source(data[: len(data) // 2])
    assert time.monotonic() - start < 1


def test_garbage_and_non_video_raise_video_decode_error(tmp_path):
    garbage = np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes()
    with pytest.raises(VideoDecodeError, match="50000 bytes"):
        open_source(garbage)
    with pytest.raises(VideoDecodeError):
        open_source(b"")
    text = tmp_path / "notes.txt"
    text.write_text("not a video\n" * 1000)
    with pytest.raises(VideoDecodeError, match="notes.txt"):
        open_source(text)


def test_missing_file_is_unavailable_quickly(tmp_path):
    start = time.monotonic()
    with pytest.raises(SourceUnavailableError, match="nothere.mp4"):
        open_source(tmp_path / "nothere.mp4", DecodeConfig(reconnect=True))
    assert time.monotonic() - start < 1


def test_invalid_sources_and_config():
    with pytest.raises(InvalidInputError, match="scheme"):
        open_source("ftp://example.com/a.mp4")
    with pytest.raises(InvalidInputError):
        open_source(12345)
    for bad in (dict(fps=0), dict(size=(0, 4)), dict(max_frames=0), dict(backoff_s=2, max_backoff_s=1)):
        with pytest.raises(ConfigError):
            DecodeConfig(**bad)


# --- push mode -----------------------------------------------------------------------------------


def _feed(buf: PushBuffer, data: bytes, first_frame: threading.Event, errors: list) -> None:
    """Push `data` in uneven chunks; hold back the last 30% until the consumer has a frame, which
    proves it decodes while bytes are still arriving."""
    rng = np.random.default_rng(7)
    try:
        pos = 0
        while pos < len(data):
            if pos >= 0.7 * len(data):
                first_frame.wait(5)
            step = int(rng.integers(1, 3000))
            buf.push(data[pos : pos + step])
            pos += step
            time.sleep(0.0005)
        buf.close()
    except Exception as exc:  # reported by the test thread
        errors.append(exc)


@pytest.mark.parametrize(
    "container_format, options",
    [("mpegts", None), ("mp4", FRAGMENTED_MP4_OPTIONS), ("matroska", None)],
    ids=["mpegts", "fragmented-mp4", "matroska"],
)
def test_push_mode_decodes_while_chunks_arrive(container_format, options):
    data = encode(clip_frames(), container_format, container_options=options, gop_size=10)
    buf = PushBuffer(max_buffered_bytes=8192)
    first_frame, errors = threading.Event(), []
    producer = threading.Thread(target=_feed, args=(buf, data, first_frame, errors))
    producer.start()
    frames = []
    with open_source(buf, DecodeConfig()) as src:
        for frame in src:
            if not frame.index:
                arrived_early = not buf.closed
                first_frame.set()
            frames.append(frame)
    producer.join(5)
    assert not errors and arrived_early
    assert times(frames) == pytest.approx([i / FPS for i in range(T)], abs=2e-3)
    assert [index_of(f.image) for f in frames] == [i % 32 for i in range(T)]


@pytest.mark.parametrize("fps, seconds, gop", [(4.0, 4, 4), (1.0, 3, 1)])  # a keyframe each second
def test_a_pushed_stream_shorter_than_ffmpegs_default_probe_already_gives_frames(fps, seconds, gop):
    """FFmpeg's default probe reads 5 s of a stream (or 20 frames, to estimate its rate) before its
    first frame: a live upload would wait for that much video. Here a few seconds are pushed and
    the upload stays open; the rate is the codec's (FFmpeg's guess would be twice it)."""
    buffer = io.BytesIO()
    write_video(buffer, clip_frames(int(fps * seconds)), fps, container_format="mpegts", gop_size=gop)
    buf = PushBuffer()
    buf.push(buffer.getvalue())
    first = []

    def read_first():
        with contextlib.suppress(Exception), open_source(buf, DecodeConfig(read_timeout_s=60)) as src:
            first.append((next(iter(src)), src.stream_info.fps))

    reader = threading.Thread(target=read_first, daemon=True)
    reader.start()
    reader.join(30)  # the default probe would block until the read timeout, 60 s, or more bytes
    assert first and first[0][0].index == 0 and first[0][1] == fps
    buf.close()


def test_push_buffer_backpressure_and_close():
    buf = PushBuffer(max_buffered_bytes=100)
    buf.push(b"a" * 60)
    with pytest.raises(PushBufferTimeout):
        buf.push(b"b" * 60, timeout=0.05)  # would exceed the limit and nobody reads
    threading.Timer(0.05, buf.read, args=(10,)).start()
    start = time.monotonic()
    buf.push(b"c" * 50, timeout=5)  # blocks until the reader made room
    assert 0.03 < time.monotonic() - start < 2 and buf.buffered_bytes == 100
    assert buf.read(1000) == b"a" * 50 + b"c" * 50
    buf.push(b"d" * 500)  # larger than the limit: accepted into an empty buffer
    buf.close()
    with pytest.raises(InvalidInputError, match="after close"):
        buf.push(b"e")
    assert buf.read(300) == b"d" * 300 and buf.read() == b"d" * 200 and buf.read() == b""


def test_closing_the_source_releases_a_blocked_producer(ts_bytes):
    buf = PushBuffer(max_buffered_bytes=4096)
    outcome = []

    def produce():
        try:
            for pos in range(0, len(ts_bytes), 1000):
                buf.push(ts_bytes[pos : pos + 1000], timeout=10)
            outcome.append("finished")
        except InvalidInputError as exc:
            outcome.append(exc)

    producer = threading.Thread(target=produce)
    producer.start()
    with open_source(buf, DecodeConfig(max_frames=3)) as src:
        assert len(list(src)) == 3
    producer.join(5)
    assert not producer.is_alive() and isinstance(outcome[0], InvalidInputError)


def test_close_from_another_thread_stops_a_consumer_waiting_for_bytes(ts_bytes):
    buf = PushBuffer()
    buf.push(ts_bytes[: len(ts_bytes) // 2])  # the producer then goes quiet
    src = open_source(buf, DecodeConfig(read_timeout_s=None))
    got, first = [], threading.Event()

    def consume():
        for frame in src:
            got.append(frame)
            first.set()

    consumer = threading.Thread(target=consume)
    consumer.start()
    assert first.wait(5)
    time.sleep(0.1)  # let it block in read()
    src.close()
    consumer.join(2)
    assert not consumer.is_alive() and 0 < len(got) < T


def test_push_garbage_raises_and_stalled_producer_times_out(ts_bytes):
    buf = PushBuffer()
    buf.push(b"\x00\x01garbage" * 5000)
    buf.close()
    with pytest.raises(VideoDecodeError, match="push stream"):
        list(open_source(buf))

    buf = PushBuffer()
    buf.push(ts_bytes[: len(ts_bytes) // 2])  # and then nothing more, never closed
    got = []
    start = time.monotonic()
    with pytest.raises(SourceUnavailableError, match="no data"):
        for frame in open_source(buf, DecodeConfig(read_timeout_s=0.3)):
            got.append(frame)
    assert 20 < len(got) < T and time.monotonic() - start < 3


# --- HTTP ----------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    """Loopback HTTP server. `plans[path]` lists how to answer successive connections: "full",
    "reset" (close before answering), "stall" (send half, then hang), or a fraction of the bytes
    to send before closing the connection early. Once a plan is used up, connections are answered
    "full". `live` paths are sent without Content-Length, like a live stream."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, bytes] = {}
        self.live: set[str] = set()
        self.plans: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.hits: collections.Counter = collections.Counter()
        self.released = threading.Event()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        server: _Server = self.server
        path = self.path
        server.hits[path] += 1
        plan = server.plans[path].popleft() if server.plans[path] else "full"
        self.close_connection = True
        if plan == "reset":
            return self.connection.shutdown(socket.SHUT_RDWR)
        if path not in server.routes:
            return self.send_error(404)
        data = server.routes[path]
        self.send_response(200)
        self.send_header("Content-Type", "video/mp2t")
        if path in server.live:
            self.send_header("Connection", "close")
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if plan == "full":
            return self.wfile.write(data)
        sent = data[: len(data) // 2] if plan == "stall" else data[: int(len(data) * plan)]
        self.wfile.write(sent)
        self.wfile.flush()
        if plan == "stall":
            server.released.wait(10)
        self.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def http_server():
    server = _Server()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield server
    server.released.set()
    server.shutdown()
    server.server_close()


def test_http_source(http_server, mp4_path):
    http_server.routes["/clip.mp4"] = mp4_path.read_bytes()
    with open_source(http_server.url("/clip.mp4"), DecodeConfig(fps=2, size=(24, 32))) as src:
        frames = list(src)
        assert src.stream_info.duration == pytest.approx(3.0, abs=0.05)
    assert times(frames) == pytest.approx([0, 0.5, 1, 1.5, 2, 2.5], abs=1e-6)
    assert frames[0].image.shape == (24, 32, 3)
    assert [index_of(f.image) for f in frames] == [i % 32 for i in range(0, T, 15)]


def test_http_drop_mid_file_resumes_without_repeating_frames(http_server, ts_bytes):
    http_server.routes["/clip.ts"] = ts_bytes
    http_server.plans["/clip.ts"].append(0.5)
    with open_source(http_server.url("/clip.ts"), DecodeConfig(**FAST_RETRY)) as src:
        frames = list(src)
        assert src.frames_decoded == T
    assert http_server.hits["/clip.ts"] == 2
    assert times(frames) == pytest.approx([i / FPS for i in range(T)], abs=1e-6)
    assert [index_of(f.image) for f in frames] == [i % 32 for i in range(T)]


def test_http_reconnects_with_exponential_backoff(http_server, ts_bytes):
    http_server.routes["/clip.ts"] = ts_bytes
    http_server.plans["/clip.ts"].extend(["reset", "reset"])
    start = time.monotonic()
    frames = list(open_source(http_server.url("/clip.ts"), DecodeConfig(max_retries=3, backoff_s=0.1)))
    elapsed = time.monotonic() - start
    assert http_server.hits["/clip.ts"] == 3 and len(frames) == T
    assert 0.3 <= elapsed < 3  # waited 0.1 s, then 0.2 s


def test_http_gives_up_after_max_retries(http_server, ts_bytes):
    http_server.routes["/clip.ts"] = ts_bytes
    http_server.plans["/clip.ts"].extend(["reset"] * 10)
    with pytest.raises(SourceUnavailableError, match="127.0.0.1.*gave up after 2 retries"):
        open_source(http_server.url("/clip.ts"), DecodeConfig(**FAST_RETRY))
    assert http_server.hits["/clip.ts"] == 3


def test_http_live_stream_continues_its_time_line_across_reconnects(http_server, ts_bytes):
    http_server.routes["/live.ts"] = ts_bytes
    http_server.live.add("/live.ts")
    http_server.plans["/live.ts"].extend([0.5, "full", "reset", "reset"])
    frames = []
    with pytest.raises(SourceUnavailableError, match="gave up after 2 retries"):
        for frame in open_source(http_server.url("/live.ts"), DecodeConfig(**FAST_RETRY)):
            frames.append(frame)
    first = len(frames) - T  # frames from the first, cut connection; the second sent the whole clip
    assert 20 < first < T and http_server.hits["/live.ts"] == 4
    assert times(frames) == pytest.approx([i / FPS for i in range(len(frames))], abs=1e-6)
    assert [index_of(f.image) for f in frames[first:]] == [i % 32 for i in range(T)]


def test_http_stalled_server_times_out(http_server, ts_bytes):
    http_server.routes["/clip.ts"] = ts_bytes
    http_server.plans["/clip.ts"].append("stall")
    got = []
    start = time.monotonic()
    with pytest.raises(SourceUnavailableError, match="timed out"):
        for frame in open_source(http_server.url("/clip.ts"), DecodeConfig(reconnect=False, read_timeout_s=0.3)):
            got.append(frame)
    assert 20 < len(got) < T and time.monotonic() - start < 3


def test_http_errors_that_retrying_cannot_fix_are_raised_at_once(http_server):
    http_server.routes["/notes.txt"] = b"hello, not a video\n" * 500
    with pytest.raises(SourceUnavailableError, match="missing.ts"):
        open_source(http_server.url("/missing.ts"), DecodeConfig(**FAST_RETRY))
    with pytest.raises(VideoDecodeError, match="notes.txt"):
        open_source(http_server.url("/notes.txt"), DecodeConfig(**FAST_RETRY))
    assert http_server.hits["/missing.ts"] == 1 and http_server.hits["/notes.txt"] == 1


@pytest.mark.parametrize("scheme", ["http", "rtsp"])
def test_refused_connection_is_unavailable_quickly(scheme):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"{scheme}://user:secret@127.0.0.1:{port}/stream"
    start = time.monotonic()
    with pytest.raises(SourceUnavailableError, match="refused") as info:
        open_source(url, DecodeConfig(reconnect=False))
    assert time.monotonic() - start < 1
    assert "secret" not in str(info.value) and f"127.0.0.1:{port}" in str(info.value)
    start = time.monotonic()
    with pytest.raises(SourceUnavailableError, match="gave up after 2 retries"):
        open_source(url, DecodeConfig(max_retries=2, backoff_s=0.05))
    assert 0.15 <= time.monotonic() - start < 2  # 0.05 s + 0.1 s of backoff


def test_frame_source_is_a_closeable_iterator(mp4_path):
    src = open_source(mp4_path)
    assert isinstance(src, FrameSource) and iter(src) is src
    assert next(src).index == 0
    src.close()
    assert list(src) == []
