"""Live protocols through the stream decoder (issue 21, item 8), from real servers on loopback:
- RTSP from GStreamer's RTSP server (tests/rtsp_server.py, run by the system python), which
  streams an MPEG-TS clip's H.264 over RTP at its own pace and ends the session at its end;
- HLS over a stdlib HTTP server: a finished (VOD) playlist, a live one that grows while it is
  read, and one with a damaged segment;
and corruption in the middle of a live stream: the stream goes on after it."""

from __future__ import annotations

import contextlib
import functools
import io
import shutil
import socket
import subprocess
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from pipeline.decode import DecodeConfig, open_source
from pipeline.video_io import write_video

FPS = 30
N = 90  # 3 s
SYSTEM_PYTHON = "/usr/bin/python3"
RTSP_SERVER = Path(__file__).with_name("rtsp_server.py")
LIVE = DecodeConfig(reconnect=False, open_timeout_s=30, read_timeout_s=30)


def clip(n: int = N) -> np.ndarray:
    frames = np.zeros((n, 64, 96, 3), np.uint8)
    frames[..., 0] = ((np.arange(n) * 8) % 256)[:, None, None]
    frames[..., 2] = 128
    return frames


def textured(n: int = N) -> np.ndarray:
    """Noise: packets of several KB, so 10 KB of zeros damages one or two of them."""
    return np.random.default_rng(3).integers(0, 256, (n, 96, 128, 3), dtype=np.uint8)


def index_of(image: np.ndarray) -> int:
    return int(round(float(image[..., 0].mean()) / 8)) % 32


def zeroed(data: bytes, size: int = 10 * 1024) -> bytes:
    mid = len(data) // 2
    return data[:mid] + bytes(size) + data[mid + size:]


def ts_bytes(frames: np.ndarray, gop: int = 15) -> bytes:
    buf = io.BytesIO()
    write_video(buf, frames, FPS, container_format="mpegts", gop_size=gop)
    return buf.getvalue()


def check_whole(frames: list, n: int = N) -> None:
    assert [f.time for f in frames] == pytest.approx([i / FPS for i in range(n)], abs=1e-3)
    assert [index_of(f.image) for f in frames] == [i % 32 for i in range(n)]


def went_on_after_damage(frames: list, lost_at_most: int, n: int = N) -> None:
    """Some frames lost to the damage, the rest, up to the last, on the source's time grid."""
    times = [f.time for f in frames]
    assert n - lost_at_most <= len(times) < n, len(times)
    assert times == sorted(set(times)) and all(abs(t * FPS - round(t * FPS)) < 1e-3 for t in times)
    assert times[-1] == pytest.approx((n - 1) / FPS, abs=1e-3)


# --- RTSP ----------------------------------------------------------------------------------------


def _rtsp_server_available() -> bool:
    probe = "import gi; gi.require_version('GstRtspServer', '1.0'); from gi.repository import GstRtspServer"
    return Path(SYSTEM_PYTHON).exists() and subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True).returncode == 0


@pytest.fixture
def rtsp_serve(tmp_path):
    """rtsp_serve(ts_bytes) -> rtsp:// URL of a real RTSP server streaming that clip."""
    if not _rtsp_server_available():
        pytest.skip("GStreamer's RTSP server is not installed (make test installs python3-gi, "
                    "gir1.2-gst-rtsp-server-1.0, gstreamer1.0-plugins-{base,good,bad})")
    servers = []

    def serve(data: bytes, port: int | None = None) -> str:
        clip_path = tmp_path / f"clip{len(servers)}.ts"
        clip_path.write_bytes(data)
        if port is None:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
        server = subprocess.Popen([SYSTEM_PYTHON, str(RTSP_SERVER), str(port), str(clip_path)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        servers.append(server)
        line = server.stdout.readline()
        assert line.strip() == "ready", f"RTSP server did not start: {line!r} {server.stderr.read()}"
        return f"rtsp://127.0.0.1:{port}/clip"

    yield serve
    for server in servers:
        server.terminate()
        server.wait(10)


def test_rtsp_source_gives_every_frame_in_order(rtsp_serve):
    url = rtsp_serve(ts_bytes(clip()))
    with open_source(url, LIVE) as source:
        frames = list(source)
        info = source.stream_info
    assert (info.codec, info.width, info.height, info.fps, info.duration) == ("h264", 96, 64, FPS, None)
    check_whole(frames)


def test_rtsp_stream_goes_on_after_corruption_in_its_middle(rtsp_serve):
    url = rtsp_serve(zeroed(ts_bytes(textured(), gop=30)))
    with open_source(url, LIVE) as source:
        went_on_after_damage(list(source), lost_at_most=5)


def test_rtsp_session_that_ends_is_reconnected_on_a_continuing_time_line(rtsp_serve):
    # a live source does not end on its own: the end of the session counts as a drop, the decoder
    # connects again and places the new session's frames right after the last one
    url = rtsp_serve(ts_bytes(clip()))
    config = DecodeConfig(max_frames=N + 30, backoff_s=0.05, max_backoff_s=0.2, open_timeout_s=30, read_timeout_s=30)
    with open_source(url, config) as source:
        frames = list(source)
    assert [f.time for f in frames] == pytest.approx([i / FPS for i in range(N + 30)], abs=1e-3)
    assert [index_of(f.image) for f in frames] == [(i % N) % 32 for i in range(N + 30)]


# --- HLS -----------------------------------------------------------------------------------------


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def http_dir(directory: Path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def hls(directory: Path, frames: np.ndarray) -> list[tuple[str, str]]:
    """Write `frames` as a finished HLS playlist (index.m3u8, ~1 s MPEG-TS segments) with PyAV's
    hls muxer; returns the segments' (#EXTINF line, file name)."""
    directory.mkdir(parents=True, exist_ok=True)
    write_video(directory / "index.m3u8", frames, FPS, gop_size=15,
                container_options={"hls_time": "1", "hls_list_size": "0", "hls_playlist_type": "vod"})
    lines = (directory / "index.m3u8").read_text().splitlines()
    return [(line, lines[i + 1]) for i, line in enumerate(lines) if line.startswith("#EXTINF")]


def test_hls_vod_playlist(tmp_path):
    segments = hls(tmp_path, clip())
    assert len(segments) == 3
    with http_dir(tmp_path) as base, open_source(f"{base}/index.m3u8", LIVE) as source:
        frames = list(source)
        assert source.stream_info.codec == "h264"
    check_whole(frames)


def test_hls_live_playlist_read_while_it_grows(tmp_path):
    segments = hls(tmp_path / "made", clip())
    live = tmp_path / "live"
    live.mkdir()

    def publish(count: int, ended: bool) -> None:
        body = ["#EXTM3U", "#EXT-X-VERSION:3", "#EXT-X-TARGETDURATION:1", "#EXT-X-MEDIA-SEQUENCE:0"]
        for info, name in segments[:count]:
            shutil.copy(tmp_path / "made" / name, live / name)
            body += [info, name]
        body += ["#EXT-X-ENDLIST"] if ended else []
        (live / "part.m3u8").write_text("\n".join(body) + "\n")
        (live / "part.m3u8").replace(live / "index.m3u8")  # atomic: never a half-written playlist

    def grow() -> None:
        for count in range(2, len(segments) + 1):
            time.sleep(0.5)
            publish(count, ended=count == len(segments))

    publish(1, ended=False)  # live: no end marker yet
    writer = threading.Thread(target=grow, daemon=True)
    with http_dir(live) as base:
        source = open_source(f"{base}/index.m3u8", LIVE)
        writer.start()
        with source:
            frames = list(source)
    writer.join()
    check_whole(frames)


def test_hls_segment_with_damage_in_its_middle_goes_on_to_the_next(tmp_path):
    segments = hls(tmp_path, textured())
    damaged = tmp_path / segments[1][1]
    damaged.write_bytes(zeroed(damaged.read_bytes(), 4 * 1024))
    with http_dir(tmp_path) as base, open_source(f"{base}/index.m3u8", LIVE) as source:
        frames = list(source)
    # the damaged segment's frames up to its next keyframe (gop 15) at worst; the next segment whole
    went_on_after_damage(frames, lost_at_most=15)
    second_start = float(segments[0][0].split(":")[1].rstrip(",")) + float(segments[1][0].split(":")[1].rstrip(","))
    after = [round(f.time * FPS) for f in frames if f.time >= second_start - 1e-3]
    assert after == list(range(round(second_start * FPS), N))
