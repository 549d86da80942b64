"""Encoding RGB frames into real video files (test clips, synthetic streams, push-mode feeds).

Only writing lives here; reading is `pipeline.decode`. Encoding goes through PyAV's bundled FFmpeg
(libx264 by default), so the clips it makes exercise the same demuxers and decoders as real input.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np

from pipeline.errors import InvalidInputError

# MP4 laid out as self-contained fragments: it can be decoded while it is still being written or
# received (push mode), like MPEG-TS and Matroska/WebM. `default_base_moof` keeps each fragment's
# offsets relative to itself, which readers of a non-seekable stream need.
FRAGMENTED_MP4_OPTIONS: Mapping[str, str] = {"movflags": "frag_keyframe+empty_moov+default_base_moof"}

# Encoders whose `crf` option means constant quality on its own (others: defaults or `bitrate`).
_CRF_CODECS = frozenset({"libx264", "libx264rgb", "libx265"})
_DEFAULT_CRF = 12
_MP4_SUFFIXES = frozenset({".mp4", ".m4v", ".mov"})


def write_video(
    dest: str | Path | BinaryIO,
    frames: np.ndarray | Iterable[np.ndarray],
    fps: float,
    *,
    codec: str = "libx264",
    container_format: str | None = None,
    pix_fmt: str = "yuv420p",
    crf: int | None = None,
    bitrate: int | None = None,
    gop_size: int | None = None,
    container_options: Mapping[str, str] | None = None,
) -> None:
    """Encode RGB frames (`[T,H,W,3]` uint8 array, or an iterable of `[H,W,3]` uint8) as a video.

    - `container_format`: inferred from the file suffix for paths; required for file objects
      (e.g. "mp4", "mpegts", "matroska", "webm", "h264").
    - Quality: constant quality `crf`, or a target `bitrate` in bit/s (not both). Without either,
      crf 12: near-lossless, so small synthetic frames keep their colours to within a few levels.
    - Odd sizes: a pixel format with subsampled chroma (yuv420p, nv12, ...) cannot encode an odd
      width/height, so frames are padded by one column/row that repeats the edge pixels; the
      decoded video is then one pixel larger. Use `pix_fmt="yuv444p"` to keep odd sizes exact.
    - `gop_size`: frames between keyframes. Fragmented MP4 starts a fragment at each keyframe,
      so a small gop lets a push-mode reader decode the first frames before the writer finishes.
    - `container_options`: muxer options. Default: `movflags=+faststart` for MP4 written to a
      path (index first: the file decodes progressively over HTTP, and a truncated copy keeps its
      head decodable); nothing otherwise (faststart has to reopen the output by name, which a file
      object cannot do). Pass `FRAGMENTED_MP4_OPTIONS` for a streamable MP4.
    """
    if not fps > 0:
        raise InvalidInputError(f"fps must be > 0, got {fps}")
    if crf is not None and bitrate is not None:
        raise InvalidInputError("give either crf or bitrate, not both")
    if crf is None and bitrate is None:
        crf = _DEFAULT_CRF
    is_path = isinstance(dest, (str, Path))
    if container_format is None and not is_path:
        raise InvalidInputError("container_format is required when writing to a file object")
    if container_options is None:
        is_mp4 = container_format == "mp4" or (container_format is None and Path(dest).suffix.lower() in _MP4_SUFFIXES)
        container_options = {"movflags": "+faststart"} if is_path and is_mp4 else {}
    subsampled_w, subsampled_h = _chroma_subsampling(pix_fmt)

    frame_iter = _checked_frames(frames)
    first = next(frame_iter, None)
    if first is None:
        raise InvalidInputError("no frames to write")
    height, width = first.shape[:2]
    pad_h, pad_w = (height % 2) * subsampled_h, (width % 2) * subsampled_w

    try:
        target = str(dest) if is_path else dest
        container = av.open(target, "w", format=container_format, options=dict(container_options))
    except (av.FFmpegError, ValueError) as exc:
        raise InvalidInputError(f"cannot open {dest!r} for writing: {exc}") from exc
    with container:
        try:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        except (av.FFmpegError, ValueError) as exc:
            raise InvalidInputError(f"cannot encode with codec {codec!r}: {exc}") from exc
        stream.width, stream.height, stream.pix_fmt = width + pad_w, height + pad_h, pix_fmt
        if bitrate is not None:
            stream.bit_rate = bitrate
        elif crf is not None and codec in _CRF_CODECS:
            stream.options = {"crf": str(crf)}
        if gop_size is not None:
            stream.codec_context.gop_size = gop_size
        for index, rgb in enumerate(itertools.chain([first], frame_iter)):
            if rgb.shape != first.shape:
                raise InvalidInputError(f"frame {index} has shape {rgb.shape}, expected {first.shape}")
            if pad_h or pad_w:
                rgb = np.pad(rgb, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _chroma_subsampling(pix_fmt: str) -> tuple[bool, bool]:
    """(horizontal, vertical) chroma subsampling of `pix_fmt`: those dimensions must be even."""
    try:
        fmt = av.VideoFormat(pix_fmt)
    except (ValueError, av.FFmpegError) as exc:
        raise InvalidInputError(f"unknown pixel format {pix_fmt!r}") from exc
    return fmt.chroma_width(2) < 2, fmt.chroma_height(2) < 2


def _checked_frames(frames: np.ndarray | Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    if isinstance(frames, np.ndarray) and frames.ndim != 4:
        raise InvalidInputError(f"frames array must be [T,H,W,3], got shape {frames.shape}")
    for index, rgb in enumerate(frames):
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or 0 in rgb.shape:
            raise InvalidInputError(f"frame {index} must be a non-empty [H,W,3] uint8 array, not {rgb.dtype} {rgb.shape}")
        yield rgb
