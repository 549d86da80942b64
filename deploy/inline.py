"""Inline media in chat requests: `data:` URLs, as the openai client and vLLM's tests send them.

    data:video/mp4;base64,<b64>             a video file (mp4, webm, x-matroska, mp2t, ...): pushed
                                            whole to a one-shot stream's decoder
    data:video/jpeg;base64,<b64>,<b64>,...  vLLM's frames: JPEG images joined by commas, one frame each
    data:image/png;base64,<b64>             an image_url part: a one-frame video

Frames are decoded here (PyAV, in a worker thread) to RGB arrays of the first frame's size and
ingested at one frame per second (times 0, 1, 2, ... s). The decoded payload of a request is
bounded by `max_inline_bytes` (its own limit: the JSON limit is for JSON without media).
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

import numpy as np

from deploy.errors import APIError

VIDEO_TYPES = ("video/mp4", "video/webm", "video/x-matroska", "video/matroska", "video/mp2t", "video/quicktime",
               "video/mpeg", "video/x-msvideo", "video/ogg", "video/x-flv", "video/3gpp")
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/gif")
FRAMES_TYPE = "video/jpeg"
MAX_INLINE_FRAMES = 256


@dataclass(frozen=True)
class InlineMedia:
    """A request's inline video: encoded bytes of a video file, or images (one frame each)."""

    mime: str
    video: bytes | None = None  # a whole video file
    images: tuple[bytes, ...] = ()  # encoded images, one frame each

    @property
    def size(self) -> int:
        return len(self.video or b"") + sum(len(i) for i in self.images)


def is_data_url(url: str) -> bool:
    return url[:5].lower() == "data:"


def parse(url: str, max_bytes: int) -> InlineMedia:
    """The media of a data: URL; 422 for one that is malformed or of an unsupported type, 413 over
    `max_bytes` decoded."""
    head, comma, payload = url[5:].partition(",")
    mime, *params = [p.strip().lower() for p in head.split(";")]
    if not comma or "base64" not in params:
        raise APIError(422, "invalid_request", "inline media must be a base64 data: URL (data:<type>;base64,<data>)")
    if len(payload) * 3 // 4 > max_bytes:
        raise APIError(413, "too_large", f"inline media over the limit of {max_bytes} bytes")
    if mime == FRAMES_TYPE or mime in IMAGE_TYPES:
        images = tuple(_b64(part) for part in payload.split(","))
        if len(images) > MAX_INLINE_FRAMES:
            raise APIError(422, "invalid_request", f"at most {MAX_INLINE_FRAMES} inline frames")
        return InlineMedia(mime, images=images)
    if mime in VIDEO_TYPES:
        return InlineMedia(mime, video=_b64(payload))
    raise APIError(422, "invalid_request", f"inline media of type {mime!r} is not supported "
                                           f"(video/*: {', '.join(VIDEO_TYPES)}; {FRAMES_TYPE} frames; images)")


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(422, "invalid_request", "inline media is not valid base64") from None


def decode_images(images: tuple[bytes, ...]) -> np.ndarray:
    """Encoded images -> RGB frames [T, H, W, 3] uint8, each at the first one's size."""
    import av

    frames, size = [], None
    for i, data in enumerate(images):
        try:
            with av.open(io.BytesIO(data), "r") as container:
                frame = next(container.decode(video=0))
        except (av.FFmpegError, StopIteration, IndexError):
            raise APIError(422, "VideoDecodeError", f"inline frame {i} is not a readable image") from None
        size = size or (frame.height, frame.width)
        frames.append(frame.to_ndarray(format="rgb24", height=size[0], width=size[1]))
    return np.stack(frames)
