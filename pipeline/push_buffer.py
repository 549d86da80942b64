"""Pushed video bytes: the pipe from an uploader to the decoder, and how FFmpeg reads it.

`PushBuffer` is the thread-safe pipe (backpressure, close, abort); `PushReader` the one-pass file
object FFmpeg reads it through; `push_target` decides, from the first bytes, whether the upload
is decoded as it arrives or, for an MP4 whose index follows its media, whole once closed
(`pipeline.upload_format`).
"""

from __future__ import annotations

import collections
import io
import threading

from pipeline.errors import ConfigError, InvalidInputError, PushBufferTimeout, SourceUnavailableError, VideoDecodeError
from pipeline.upload_format import index_follows_media


class PushBuffer:
    """A thread-safe byte pipe from a producer (`push`) to a decoding consumer (`read`).

    The container must be streamable (MPEG-TS, Matroska/WebM, fragmented MP4): the buffer cannot
    seek, so the decoder reads it once, front to back, as bytes arrive.

    Backpressure: `push` blocks while the buffer already holds `max_buffered_bytes`, until the
    decoder has read enough; with a `timeout` it raises `PushBufferTimeout` instead of waiting
    longer. A chunk larger than the whole limit is accepted once the buffer is empty, so no chunk
    size can deadlock. `close()` ends the stream: the reader gets what is left, then end of file;
    `push` after it raises `InvalidInputError`. `abort()` is the consumer giving up (the
    `FrameSource` was closed or failed): buffered bytes are dropped, and a blocked or later `push`
    raises `InvalidInputError` rather than waiting for a reader that is gone.
    """

    def __init__(self, max_buffered_bytes: int = 16 * 2**20) -> None:
        if max_buffered_bytes < 1:
            raise ConfigError(f"max_buffered_bytes must be >= 1, got {max_buffered_bytes}")
        self.max_buffered_bytes = max_buffered_bytes
        self._chunks: collections.deque[memoryview] = collections.deque()
        self._size = 0
        self._closed = False
        self._abort_reason: str | None = None
        self._cond = threading.Condition()

    @property
    def buffered_bytes(self) -> int:
        return self._size

    @property
    def closed(self) -> bool:
        return self._closed or self._abort_reason is not None

    def push(self, chunk: bytes | bytearray | memoryview, timeout: float | None = None) -> None:
        data = bytes(chunk)  # our own copy: the caller may reuse its buffer
        with self._cond:
            if not self._cond.wait_for(lambda: self.closed or self._has_room(len(data)), timeout):
                raise PushBufferTimeout(
                    f"push stream: {self._size} bytes still unread after {timeout} s (decoder not keeping up)"
                )
            if self._abort_reason is not None:
                raise InvalidInputError(f"push stream: the decoder stopped reading ({self._abort_reason})")
            if self._closed:
                raise InvalidInputError("push stream: push() after close()")
            if data:
                self._chunks.append(memoryview(data))
                self._size += len(data)
                self._cond.notify_all()

    def close(self) -> None:
        """End of stream (producer side)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def abort(self, reason: str = "aborted") -> None:
        """Stop the stream from the consumer side; see the class docstring."""
        with self._cond:
            self._abort_reason = reason
            self._chunks.clear()
            self._size = 0
            self._cond.notify_all()

    def read(self, size: int = -1, timeout: float | None = None) -> bytes:
        """Up to `size` bytes (all buffered ones if negative), blocking until at least one byte or
        the end of the stream (b"") is there; `SourceUnavailableError` after `timeout` s without."""
        if size == 0:
            return b""
        with self._cond:
            if not self._cond.wait_for(lambda: self._chunks or self.closed, timeout):
                raise SourceUnavailableError(f"push stream: no data for {timeout} s")
            wanted = self._size if size < 0 else size
            parts = []
            while self._chunks and wanted > 0:
                head = self._chunks[0]
                if len(head) <= wanted:
                    parts.append(self._chunks.popleft())
                    wanted -= len(head)
                else:
                    parts.append(head[:wanted])
                    self._chunks[0] = head[wanted:]
                    wanted = 0
            data = b"".join(parts)
            self._size -= len(data)
            self._cond.notify_all()
            return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def _has_room(self, n: int) -> bool:
        return self._size == 0 or self._size + n <= self.max_buffered_bytes


class PushReader:
    """The file object FFmpeg reads a PushBuffer through: adds the read timeout, counted from the
    first byte (a pushed stream may exist well before its camera sends anything), and has no
    `seek`/`close`, so FFmpeg treats it as a one-pass stream that it does not own. `unread` puts
    bytes back in front (what a format check looked at). `at_end`: the end of the upload was read
    (a demuxer that stops before it stopped inside the data: damage)."""

    def __init__(self, buffer: PushBuffer, timeout: float | None) -> None:
        self._buffer, self._timeout, self._receiving = buffer, timeout, False
        self._front = b""
        self.at_end = False
        self.position = 0  # bytes handed out, those put back excluded

    def read(self, size: int) -> bytes:
        if self._front:
            size = len(self._front) if size < 0 else size
            data, self._front = self._front[:size], self._front[size:]
        else:
            data = self._buffer.read(size, self._timeout if self._receiving else None)
            self._receiving = self._receiving or bool(data)
            self.at_end = self.at_end or (not data and size != 0)
        self.position += len(data)
        return data

    def read_exactly(self, size: int) -> bytes:
        """`size` bytes, or fewer at the end of the stream."""
        parts, left = [], size
        while left > 0 and (data := self.read(left)):
            parts.append(data)
            left -= len(data)
        return b"".join(parts)

    def unread(self, data: bytes) -> None:
        self._front = data + self._front
        self.position -= len(data)


def push_target(reader: PushReader, max_whole_bytes: int, name: str) -> PushReader | io.BytesIO:
    """What FFmpeg reads a pushed stream from: the bytes as they arrive, or, for an MP4 whose index
    follows its media (`pipeline.upload_format`), the whole upload, read once it is closed."""
    whole, head = index_follows_media(reader.read_exactly)
    reader.unread(head)
    if not whole:
        return reader
    data = reader.read_exactly(max_whole_bytes + 1)
    if len(data) > max_whole_bytes:
        raise VideoDecodeError(
            f"{name}: an MP4 with its index (moov) at the end can only be decoded whole, and this one is "
            f"over {max_whole_bytes} bytes; stream it as fragmented MP4 "
            "(-movflags frag_keyframe+empty_moov) or MPEG-TS instead")
    return io.BytesIO(data)
