"""Real codecs through the stream decoder (issue 21, item 8): HEVC, VP9, AV1, MJPEG (besides the
H.264 of the other tests), a clip with an audio track, and variable frame rate. Every clip is
encoded here with PyAV's bundled encoders and decoded from a file and as a pushed upload (the
byte pipe a camera or an HTTP client feeds), with frame counts, times and content checked."""

from __future__ import annotations

import io
import threading
from fractions import Fraction

import av
import numpy as np
import pytest

from pipeline.decode import DecodeConfig, PushBuffer, open_source
from pipeline.video_io import write_video

FPS = 30
N = 60
H, W = 64, 96


def clip(n: int = N) -> np.ndarray:
    """Solid frames whose red level encodes the frame index modulo 32 (red = 8 * i)."""
    frames = np.zeros((n, H, W, 3), np.uint8)
    frames[..., 0] = ((np.arange(n) * 8) % 256)[:, None, None]
    frames[..., 1] = 40
    frames[..., 2] = 128
    return frames


def index_of(image: np.ndarray) -> int:
    return int(round(float(image[..., 0].mean()) / 8)) % 32


def pushed(data: bytes, config: DecodeConfig = DecodeConfig()) -> list:
    """Decode `data` as a pushed upload, fed in 3 KB pieces by another thread."""
    buf = PushBuffer(max_buffered_bytes=32 * 1024)

    def feed() -> None:
        for pos in range(0, len(data), 3000):
            buf.push(data[pos:pos + 3000])
        buf.close()

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    with open_source(buf, config) as source:
        frames = list(source)
    feeder.join()
    return frames


def check_clip(frames: list, n: int = N) -> None:
    assert [f.time for f in frames] == pytest.approx([i / FPS for i in range(n)], abs=1e-3)
    assert [index_of(f.image) for f in frames] == [i % 32 for i in range(n)]


CODECS = [  # (encoder, container, pixel format, the decoder's codec name)
    ("libx265", "mp4", "yuv420p", "hevc"),
    ("libx265", "mpegts", "yuv420p", "hevc"),
    ("libvpx-vp9", "webm", "yuv420p", "vp9"),
    ("libsvtav1", "matroska", "yuv420p", "libdav1d"),
    ("libsvtav1", "mp4", "yuv420p", "libdav1d"),
    ("mjpeg", "avi", "yuvj420p", "mjpeg"),
    ("mjpeg", "matroska", "yuvj420p", "mjpeg"),
]


@pytest.mark.parametrize("encoder, container_format, pix_fmt, decoder", CODECS,
                         ids=[f"{c[0]}-{c[1]}" for c in CODECS])
def test_codec_decodes_every_frame_from_a_file_and_pushed(tmp_path, encoder, container_format, pix_fmt, decoder):
    if encoder not in av.codecs_available:
        pytest.skip(f"PyAV's FFmpeg has no {encoder} encoder here")
    path = tmp_path / f"clip.{container_format}"
    write_video(path, clip(), FPS, codec=encoder, container_format=container_format, pix_fmt=pix_fmt, gop_size=10)
    with open_source(path) as source:
        frames = list(source)
        info = source.stream_info
    assert (info.codec, info.width, info.height, info.fps) == (decoder, W, H, FPS)
    check_clip(frames)
    check_clip(pushed(path.read_bytes()))


def write_with_audio(dest, container_format: str) -> None:
    """H.264 video (clip()) plus a 48 kHz stereo AAC track, interleaved as a muxer does."""
    with av.open(dest, "w", format=container_format) as out:
        video = out.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = W, H, "yuv420p"
        video.codec_context.gop_size = 10
        audio = out.add_stream("aac", rate=48_000, layout="stereo")
        samples_per_frame = 48_000 // FPS
        tone = np.sin(np.arange(N * samples_per_frame) * 2 * np.pi * 440 / 48_000).astype(np.float32)
        pcm = np.stack([tone, tone])  # [2, samples] planar float, AAC's input format
        for i, rgb in enumerate(clip()):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            out.mux(video.encode(frame))
            piece = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(pcm[:, i * samples_per_frame:(i + 1) * samples_per_frame]),
                format="fltp", layout="stereo")
            piece.sample_rate, piece.pts = 48_000, i * samples_per_frame
            out.mux(audio.encode(piece))
        out.mux(video.encode(None))
        out.mux(audio.encode(None))


@pytest.mark.parametrize("container_format", ["mp4", "mpegts", "matroska"])
def test_a_clip_with_an_audio_track_gives_its_video_frames(container_format):
    buf = io.BytesIO()
    write_with_audio(buf, container_format)
    data = buf.getvalue()
    with av.open(io.BytesIO(data)) as container:
        assert len(container.streams.audio) == 1 and len(container.streams.video) == 1
    with open_source(data) as source:
        check_clip(list(source))
    check_clip(pushed(data))


# Variable frame rate: a camera that slows down and speeds up (times in ms).
VFR_MS = [0, 33, 67, 100, 200, 300, 500, 533, 567, 600, 1000, 1040, 1080, 1500, 1510, 1520, 2000]


def write_vfr(dest, container_format: str) -> None:
    with av.open(dest, "w", format=container_format) as out:
        video = out.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = W, H, "yuv420p"
        video.time_base = Fraction(1, 1000)
        video.codec_context.time_base = Fraction(1, 1000)
        for i, (rgb, ms) in enumerate(zip(clip(len(VFR_MS)), VFR_MS)):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = ms, Fraction(1, 1000)
            out.mux(video.encode(frame))
        out.mux(video.encode(None))


@pytest.mark.parametrize("container_format", ["mp4", "matroska"])
def test_variable_frame_rate_keeps_each_frames_own_time(container_format):
    buf = io.BytesIO()
    write_vfr(buf, container_format)
    data = buf.getvalue()
    expected = [ms / 1000 for ms in VFR_MS]
    for frames in (list(open_source(data)), pushed(data)):
        assert [f.time for f in frames] == pytest.approx(expected, abs=1e-3)
        assert [index_of(f.image) for f in frames] == [i % 32 for i in range(len(VFR_MS))]
    # sampled at 5 fps (instants every 0.2 s): the first frame at or after each instant, never
    # one frame for two instants, no burst after the 0.4 s gap
    sampled = [round(f.time, 3) for f in open_source(data, DecodeConfig(fps=5))]
    assert sampled == [0.0, 0.2, 0.5, 0.6, 1.0, 1.5, 2.0]
