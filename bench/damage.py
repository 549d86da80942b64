"""What the stream decoder yields from damaged input, other codecs and live protocols (issue 21):
frames decoded against frames encoded, and the damage it counted, one row per case.

    python -m bench.damage

Every clip is encoded here with PyAV; the RTSP rows need GStreamer's RTSP server (`make
rtsp-server`, run by the system python as in tests/test_live_sources.py). Writes
bench/results/damage.json. Counts, not times: each row is deterministic for a given PyAV/FFmpeg.
"""

from __future__ import annotations

import functools
import io
import json
import socket
import subprocess
import tempfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from pipeline.decode import DecodeConfig, PushBuffer, open_source
from pipeline.video_io import FRAGMENTED_MP4_OPTIONS, write_video

FPS = 30
RTSP_SERVER = Path(__file__).resolve().parent.parent / "tests" / "rtsp_server.py"
LIVE = DecodeConfig(reconnect=False, open_timeout_s=30, read_timeout_s=30)


def noise(n: int) -> np.ndarray:
    """Textured frames (96x128 noise): packets of ~10 KB, like real footage at this size."""
    return np.random.default_rng(3).integers(0, 256, (n, 96, 128, 3), dtype=np.uint8)


def encode(frames: np.ndarray, container_format: str, **options) -> bytes:
    buf = io.BytesIO()
    write_video(buf, frames, FPS, container_format=container_format, **options)
    return buf.getvalue()


def zeroed(data: bytes, size: int = 10 * 1024) -> bytes:
    mid = len(data) // 2
    return data[:mid] + bytes(size) + data[mid + size:]


def decode(source, config: DecodeConfig = DecodeConfig()) -> dict:
    count, frames, error = 0, None, None
    try:
        with open_source(source, config) as frames:
            for _ in frames:
                count += 1
    except Exception as exc:  # noqa: BLE001 - a row of the table, not a crash
        error = f"{type(exc).__name__}: {exc}"
    return {"frames": count, "skipped": getattr(frames, "packets_skipped", None),
            "late": getattr(frames, "late_frames", None), "error": error}


def pushed(pieces: list[bytes]) -> dict:
    buf = PushBuffer(max_buffered_bytes=64 * 1024)

    def feed() -> None:
        for piece in pieces:
            buf.push(piece)
        buf.close()

    threading.Thread(target=feed, daemon=True).start()
    return decode(buf)


def rtsp(data: bytes, tmp: Path) -> dict:
    clip = tmp / f"rtsp{len(data)}.ts"
    clip.write_bytes(data)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(["/usr/bin/python3", str(RTSP_SERVER), str(port), str(clip)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        if server.stdout.readline().strip() != "ready":
            return {"frames": 0, "skipped": None, "late": None, "error": "no RTSP server (make rtsp-server)"}
        return decode(f"rtsp://127.0.0.1:{port}/clip", LIVE)
    finally:
        server.terminate()
        server.wait(10)


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def hls(frames: np.ndarray, tmp: Path, damage_segment: int | None = None) -> dict:
    root = tmp / f"hls{damage_segment}"
    root.mkdir()
    write_video(root / "index.m3u8", frames, FPS, gop_size=15,
                container_options={"hls_time": "1", "hls_list_size": "0", "hls_playlist_type": "vod"})
    if damage_segment is not None:
        segment = root / f"index{damage_segment}.ts"
        segment.write_bytes(zeroed(segment.read_bytes(), 4 * 1024))
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        return decode(f"http://127.0.0.1:{server.server_address[1]}/index.m3u8", LIVE)
    finally:
        server.shutdown()
        server.server_close()


def cases(tmp: Path):
    """(case, frames encoded, result) rows."""
    clip = noise(120)
    for name, fmt, options in (("MP4 (index at the end)", "mp4", None), ("fragmented MP4", "mp4", FRAGMENTED_MP4_OPTIONS),
                               ("MPEG-TS", "mpegts", None), ("Matroska", "matroska", None)):
        yield f"{name}, 10 KB of zeros in the middle", 120, decode(zeroed(encode(clip, fmt, gop_size=30, container_options=options)))
    fmp4 = zeroed(encode(clip, "mp4", gop_size=30, container_options=FRAGMENTED_MP4_OPTIONS))
    yield "pushed fragmented MP4, 10 KB of zeros", 120, pushed([fmp4[i:i + 4096] for i in range(0, len(fmp4), 4096)])
    whole = encode(clip, "mp4", gop_size=30, container_options=FRAGMENTED_MP4_OPTIONS)
    moof = whole.index(b"moof", whole.index(b"moof") + 4) - 4  # the second fragment's header
    broken = whole[:moof] + bytes(64) + whole[moof + 64:]
    yield "pushed fragmented MP4, 64 zero bytes over a fragment header", 120, pushed(
        [broken[i:i + 4096] for i in range(0, len(broken), 4096)])
    ts = encode(clip, "mpegts", gop_size=30)
    quarter = len(ts) // 4
    yield "pushed MPEG-TS, chunk 1 of 0-3 missing (as after close)", 120, pushed([ts[:quarter], ts[2 * quarter:]])
    mp4 = encode(clip, "mp4", gop_size=30)
    yield f"pushed MP4 with its index at the end ({len(mp4) // 1000} KB)", 120, pushed([mp4[i:i + 50_000] for i in range(0, len(mp4), 50_000)])
    small = noise(60)
    for codec, fmt, pix in (("libx265", "mp4", "yuv420p"), ("libvpx-vp9", "webm", "yuv420p"),
                            ("libsvtav1", "matroska", "yuv420p"), ("mjpeg", "avi", "yuvj420p")):
        yield f"{codec} in {fmt}", 60, decode(encode(small, fmt, codec=codec, pix_fmt=pix, gop_size=10))
    yield "RTSP (GStreamer's server), H.264", 90, rtsp(encode(noise(90), "mpegts", gop_size=15), tmp)
    yield "RTSP, 10 KB of zeros in the middle", 90, rtsp(zeroed(encode(noise(90), "mpegts", gop_size=30)), tmp)
    yield "HLS over HTTP, 3 segments", 90, hls(noise(90), tmp)
    yield "HLS, 4 KB of zeros in segment 1", 90, hls(noise(90), tmp, damage_segment=1)


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case, expected, result in cases(Path(tmp)):
            rows.append({"case": case, "expected": expected, **result})
    table = Table("case", "frames / encoded", "packets skipped", "late frames", "error")
    for row in rows:
        table.add_row(row["case"], f"{row['frames']} / {row['expected']}", str(row["skipped"]), str(row["late"]),
                      row["error"] or "")
    Console(width=150).print(table)
    out = Path(__file__).parent / "results" / "damage.json"
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
