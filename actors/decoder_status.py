"""What a StreamDecoder reports: its status snapshot (`status()`), the warning when its frames are
not the whole video, the error that ended it, and its source's kind and name (URL credentials
masked). `DecoderStatus` is mixed into `StreamDecoder` (actors/decoder.py) and reads its state
under its lock.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from actors.messages import SourceState

log = logging.getLogger(__name__)

__all__ = ["DecoderStatus"]


def _error_info(exc: BaseException, where: str) -> dict:
    cause = getattr(exc, "cause", None)  # RayTaskError carries the sink's own exception
    if isinstance(cause, BaseException):
        exc = cause
    return {"type": type(exc).__name__, "message": str(exc), "where": where}


def _warning(state: SourceState, damage: tuple[int, int], chunks_skipped: int, frames: int, error: dict | None) -> str | None:
    """Why the frames of a stream are not the whole video, in a sentence; None when they are.
    damage: (undecodable packets skipped, frames dropped as out of order after them)."""
    notes = []
    if any(damage):
        notes.append(f"the video is damaged: {damage[0]} corrupt packet(s) skipped, {damage[1]} frame(s) out of "
                     "order dropped")
    if chunks_skipped:
        notes.append(f"{chunks_skipped} numbered upload chunk(s) never arrived and were skipped")
    if state is SourceState.FAILED and frames and error is not None and error["where"] == "source":
        notes.append(f"decoding stopped early ({error['message']}): only the first {frames} sampled frames were read")
    return "; ".join(notes) or None


def _source_kind(source: object) -> str:
    if source is None:
        return "push"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "bytes"
    if isinstance(source, str) and "://" in source:
        return urlsplit(source).scheme.lower()
    return "file"


def _source_name(source: object) -> str:
    if source is None:
        return "<push stream>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    text = str(source)
    if "://" in text:
        parts = urlsplit(text)
        if parts.password is not None:  # never report credentials
            netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
            text = parts._replace(netloc=netloc).geturl()
    return text


class DecoderStatus:
    """A StreamDecoder's status and errors (see the module docstring)."""

    def status(self) -> dict:
        """A snapshot; never blocks on decoding or on the sink.

        state: a SourceState's value (actors/messages.py). frames_decoded: sampled frames the source yielded;
        frames_sent: frames in submitted ingest calls; frames_delivered: frames in calls that
        completed successfully; frames_dropped: by the "drop" policy, or left unsent by a stop or
        failure. chunks_in_flight: un-finished ingest calls now (<= max_in_flight);
        max_chunks_in_flight: the most seen. waiting_for_sink: a sink call was lost with the
        sink's process and no resync came yet; resyncs: how many came. chunks_skipped: numbered
        pushes given up (push). frame_shape: [height, width] of the last chunk sent (its
        DecodeConfig.size, else the source's). last_error: None or {"type", "message", "where":
        "source" | "sink"}. packets_skipped: undecodable (corrupt) packets the decoder skipped;
        late_frames: frames it dropped as put out of order after them (pipeline.decode).
        warning: None, or why the frames sent are not the whole video (packets skipped, decoding
        ended early by an error): answers over them should say so. source: kind ("file",
        "http", "rtsp", "push", "bytes", ...), name (URL credentials masked), source_frames
        (frames decoded before sampling), stream_info, push_buffered_bytes."""
        with self._lock:
            src = self._frame_source
            info = getattr(src, "stream_info", None)
            damage = (getattr(src, "packets_skipped", 0), getattr(src, "late_frames", 0))
            return {
                "stream_id": self.stream_id,
                "state": self._state.value,
                "policy": self._policy,
                "chunk_frames": self._chunk_frames,
                "max_in_flight": self._max_in_flight,
                "frames_decoded": self._frames_decoded,
                "frames_sent": self._frames_sent,
                "frames_delivered": self._frames_delivered,
                "frames_dropped": self._frames_dropped,
                "frame_shape": None if self._frame_shape is None else list(self._frame_shape),
                "chunks_sent": self._chunks_sent,
                "chunks_dropped": self._chunks_dropped,
                "chunks_in_flight": len(self._pending),
                "max_chunks_in_flight": self._max_seen_in_flight,
                "waiting_for_sink": self._sink_lost is not None,
                "resyncs": self._resyncs,
                "chunks_skipped": self._chunks_skipped,
                "last_error": None if self._last_error is None else dict(self._last_error),
                "packets_skipped": damage[0],
                "late_frames": damage[1],
                "warning": _warning(self._state, damage, self._chunks_skipped, self._frames_decoded,
                                    self._last_error),
                "source": {
                    "kind": _source_kind(self._source),
                    "name": getattr(src, "name", None) or _source_name(self._source),
                    "source_frames": getattr(src, "frames_decoded", 0),
                    "stream_info": None if info is None else {
                        "width": info.width, "height": info.height, "fps": info.fps,
                        "duration": info.duration, "codec": info.codec,
                    },
                    "push_buffered_bytes": None if self._push is None else self._push.buffered_bytes,
                },
                "started_at": self._started_at,
                "ended_at": self._ended_at,
            }

    def _fail(self, exc: BaseException, where: str) -> None:
        with self._lock:
            if self._last_error is None:  # keep the first cause
                self._last_error = _error_info(exc, where)
        log.warning("stream %s: %s error: %s", self.stream_id, where, self._last_error)
