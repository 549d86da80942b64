"""Push mode of a StreamDecoder (`source=None`): the owner feeds the container bytes (MPEG-TS,
Matroska/WebM, fragmented MP4: streamable formats) with `push(chunk, seq)` and ends them with
`close()`. `PushOrder` is mixed into `StreamDecoder` (actors/decoder.py): it writes the pushed
chunks to the decoder's PushBuffer (`self._push`) in `seq` order, parks the early ones, gives
missing ones up after `reorder_wait_s`, and ends the upload on close.
"""

from __future__ import annotations

import logging
import threading
import time

import ray

from actors.messages import PushReceipt
from pipeline.errors import InvalidInputError, PushBufferTimeout

log = logging.getLogger(__name__)

__all__ = ["PushOrder"]


class PushOrder:
    """A StreamDecoder's push mode (see the module docstring)."""

    def _init_push_order(self, first_seq: int | None, reorder_wait_s: float) -> None:
        """The push ordering state; called by StreamDecoder.__init__."""
        self._push_cond = threading.Condition()
        self._stash: dict[int, bytes] = {}
        self._next_seq = first_seq or 0
        self._seq_from_first = first_seq is None
        self._auto_seq = 0
        self._reorder_wait_s = float(reorder_wait_s)
        self._gap_since: float | None = None  # when parked chunks started waiting for a missing one
        self._chunks_skipped = 0  # numbered pushes given up
        self._draining = False
        self._close_at: int | None = None
        self._close_deadline: float | None = None  # (monotonic) after it, missing chunks are given up at once

    @ray.method(concurrency_group="push")
    def push(self, chunk: bytes, seq: int | None = None, timeout_s: float | None = None) -> PushReceipt:
        """Feed container bytes (push mode only); returns the bytes still buffered and the
        stream's state (a PushReceipt: an uploader needs no status call to learn it).

        Ordering: Ray runs a threaded actor's calls in any order, so either wait for each push
        before sending the next (then `seq` may be left out), or number the chunks 0, 1, 2, ...
        with `seq`: chunks are then written to the decoder in `seq` order whatever order the
        calls run in, and a repeated `seq` is ignored (safe retries). Do not mix the two styles.
        A missing `seq` is given up (skipped) when a later chunk is parked `reorder_wait_s` after
        the gap was first seen (`chunks_skipped` in status; it is ignored if it comes later): a
        chunk its client did not send again (e.g. refused with a 503 while the coordinator
        restarted) stalls the stream no longer than that.

        Backpressure: the call that writes a chunk blocks while the decoder's buffer is full; a
        chunk that arrives before an earlier `seq` is parked and its call returns at once, so
        bound the number of un-finished pushes. After `timeout_s` the writing call raises
        `PushBufferTimeout`; its chunk stays queued, first in line (with `seq`, pushing it again
        is harmless; without, do not push it again).
        Raises InvalidInputError if the stream is not in push mode, was closed, or has ended.
        """
        if self._push is None:
            raise InvalidInputError(f"stream {self.stream_id!r} is not in push mode (it has a source)")
        if self._stop.is_set() or self._done.is_set():
            raise InvalidInputError(f"stream {self.stream_id!r} has ended ({self._state.value}); push() refused")
        data = bytes(chunk)
        with self._push_cond:
            if self._close_at is not None and (seq is None or seq >= self._close_at):
                raise InvalidInputError(f"stream {self.stream_id!r}: push() after close()")
            if seq is None:
                seq = self._auto_seq
                self._auto_seq += 1
            elif int(seq) != seq or seq < 0:
                raise InvalidInputError(f"seq must be an int >= 0, got {seq!r}")
            elif self._seq_from_first:
                self._next_seq, self._seq_from_first = int(seq), False
            if seq < self._next_seq:
                return self._receipt()  # a repeat of a chunk already written
            self._stash.setdefault(int(seq), data)  # a repeat of a parked chunk keeps the first copy
            self._skip_a_lasting_gap()
            if self._draining:
                return self._receipt()  # the active writer will write it in order
            self._draining = True
        self._drain(timeout_s)
        return self._receipt()

    def _receipt(self) -> PushReceipt:
        return PushReceipt(self._push.buffered_bytes, self._state)  # (one read each: no lock needed)

    @ray.method(concurrency_group="push")
    def close(self, chunks: int | None = None) -> None:
        """End the pushed stream. With `seq`-numbered pushes pass `chunks`, the total number of
        chunks: the end takes effect once chunks 0 .. chunks-1 are all written, or, for those
        still missing `reorder_wait_s` after the close, once they are given up (skipped). Without
        it the stream ends after the chunks already received, and missing ones (a gap in the
        `seq` numbers) are given up at once: what arrived is decoded right away. Returns at once:
        chunks parked behind a gap are written by a thread of their own (writing waits for the
        decoder to make room)."""
        if self._push is None:
            raise InvalidInputError(f"stream {self.stream_id!r} is not in push mode (it has a source)")
        with self._push_cond:
            wait = self._reorder_wait_s if chunks is not None else 0.0
            if chunks is None:
                chunks = max([self._next_seq, self._auto_seq, *(s + 1 for s in self._stash)])
            self._close_at = int(chunks)
            self._close_deadline = time.monotonic() + wait
        writer = threading.Timer(wait, self._write_parked)  # gives the missing chunks up then
        writer.daemon = True
        writer.start()

    def _write_parked(self) -> None:
        """Write what is parked, unless a writer is active (it does it), and end the upload if
        it is complete (or its missing chunks are given up)."""
        with self._push_cond:
            self._skip_a_lasting_gap()
            if self._draining:
                return
            self._draining = True
        try:
            self._drain(None)
        except Exception as exc:  # noqa: BLE001 - the stream ended meanwhile (stopped or failed)
            log.debug("%s: nothing more written after close: %s", self.stream_id, exc)

    def _skip_a_lasting_gap(self) -> None:
        """Give the missing next chunk up if parked chunks have waited for it reorder_wait_s, or
        every missing one once the close's deadline passed (call under self._push_cond)."""
        closing = self._close_deadline is not None and time.monotonic() >= self._close_deadline
        if closing and self._next_seq < self._close_at and self._next_seq not in self._stash:
            end = min([self._close_at, *self._stash])
            self._chunks_skipped += end - self._next_seq
            self._next_seq, self._gap_since = end, None
            return
        if not self._stash or self._next_seq in self._stash:
            self._gap_since = None
            return
        now = time.monotonic()
        self._gap_since = self._gap_since if self._gap_since is not None else now
        if now - self._gap_since >= self._reorder_wait_s:
            self._chunks_skipped += min(self._stash) - self._next_seq
            self._next_seq, self._gap_since = min(self._stash), None

    def _drain(self, timeout_s: float | None) -> None:
        """Write parked chunks in seq order, as the single active writer."""
        seq, data = -1, b""
        try:
            while True:
                with self._push_cond:
                    self._skip_a_lasting_gap()
                    seq = self._next_seq
                    data = self._stash.pop(seq, None)
                    if data is None:
                        self._draining = False
                        if self._close_at is not None and seq >= self._close_at:
                            self._push.close()
                        return
                    self._next_seq += 1
                self._push.push(data, timeout=timeout_s)
        except PushBufferTimeout:
            with self._push_cond:  # nothing was written: the chunk stays first in line
                self._stash[seq] = data
                self._next_seq = seq
                self._draining = False
            raise
        except BaseException:
            with self._push_cond:
                self._draining = False
                self._stash.clear()  # the stream is over (stopped, failed or closed)
            raise
