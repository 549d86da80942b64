"""Whether a pushed upload can be decoded as it arrives, told from its first bytes.

An ISO BMFF file (MP4, MOV, M4V) is a sequence of boxes: a 4-byte big-endian size (1: a 64-bit
size follows the type; 0: the box runs to the end of the file), a 4-byte type, then the payload.
A reader that cannot seek needs the index (`moov`) before the media data (`mdat`): fragmented MP4
(an empty `moov`, then `moof` + `mdat` fragments) and "faststart" files have it. The default MP4
of ffmpeg and PyAV writes `mdat` first and `moov` at the end: only a reader holding the whole
file can decode it, so such an upload is buffered until it is closed, then decoded.

Anything else (MPEG-TS, Matroska/WebM, a file that is not ISO BMFF) streams as it is.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

# Boxes that may come before the index or the media data; their payloads are read past.
_LEADING = frozenset({b"ftyp", b"styp", b"free", b"skip", b"wide", b"uuid", b"pdin", b"sidx", b"prft"})
_MAX_LEADING_BYTES = 1 << 20  # leading boxes larger than this: not a layout this check knows


def index_follows_media(read_exactly: Callable[[int], bytes]) -> tuple[bool, bytes]:
    """(True when the bytes are an MP4 whose `mdat` comes before its `moov`, the bytes read).

    `read_exactly(n)` returns n bytes, or fewer at the end of the stream. The caller hands the
    bytes read on to the decoder first (they are part of the video)."""
    head = b""
    while len(head) <= _MAX_LEADING_BYTES:
        header = read_exactly(8)
        head += header
        if len(header) < 8:
            return False, head
        size, kind = struct.unpack(">I4s", header)
        if len(head) == 8 and kind not in (b"ftyp", b"styp"):
            return False, head  # not ISO BMFF: those start with a file type box
        if kind == b"mdat":
            return True, head  # media before any index
        if kind not in _LEADING:  # moov, moof (index first) or a layout this check does not know
            return False, head
        if size == 1:
            large = read_exactly(8)
            head += large
            if len(large) < 8:
                return False, head
            payload = struct.unpack(">Q", large)[0] - 16
        elif size >= 8:
            payload = size - 8
        else:  # 0 (to the end) or malformed: no index follows
            return False, head
        if payload > _MAX_LEADING_BYTES:
            return False, head
        body = read_exactly(payload)
        head += body
        if len(body) < payload:
            return False, head
    return False, head
