"""The coordinator's thumbnailer: ingested frames -> each stream's thumbnails (the web console's
timeline and evidence pictures), off the coordinator's event loop.

The coordinator hands it each chunk's frames once they are ingested (their frame numbers known).
Per stream the work runs in order, one chunk at a time, in a worker thread (JPEG encoding and
the store's I/O): only the frames the store keeps at its stride are encoded
(cache_store/thumbnails.py). Thumbnails are a view, never a reason to hold a stream back: a
stream whose thumbnails fall `max_pending` chunks behind gets none for the next chunk (its
neighbours stand in), and a failed write is logged, not raised. `drop` waits for the stream's
work in flight, then frees its thumbnails, so none is written after the stream is deleted; a
store that refuses the deletion (Redis down) never fails it: it is tried again, backing off.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import numpy as np

from cache_store.thumbnails import Thumbnail, ThumbnailStore, encode_jpeg

MAX_PENDING = 4  # chunks per stream waiting for their thumbnails
RETRY_S = (0.5, 30.0)  # a deletion the store refused (Redis down) is tried again: first wait, longest
log = logging.getLogger(__name__)


class ThumbnailKeeper:
    def __init__(self, store: ThumbnailStore, spawn: Callable, max_pending: int = MAX_PENDING):
        """spawn: runs a coroutine as a task of its own (the coordinator's `_detached`)."""
        self.store, self.spawn, self.max_pending = store, spawn, max_pending
        self.tails: dict[str, asyncio.Task] = {}  # each stream's last scheduled chunk
        self.pending: dict[str, int] = {}
        self.undeleted: set[str] = set()  # deleted streams whose thumbnails the store still holds

    def keep(self, stream_id: str, first: int, frames: np.ndarray) -> None:
        """Thumbnails of frames [first, first + len(frames)) of the stream (uint8 [T, H, W, 3])."""
        if self.pending.get(stream_id, 0) >= self.max_pending:
            return
        self.pending[stream_id] = self.pending.get(stream_id, 0) + 1
        self.tails[stream_id] = self.spawn(self._write(self.tails.get(stream_id), stream_id, first, frames))

    async def _write(self, previous: asyncio.Task | None, stream_id: str, first: int, frames: np.ndarray) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        try:
            await asyncio.to_thread(self._encode_and_add, stream_id, first, frames)
        except Exception as error:  # noqa: BLE001 - a view only: the stream goes on without these
            log.warning("thumbnails of stream %r frames %d..: %s: %s", stream_id, first, type(error).__name__, error)
        finally:
            self.pending[stream_id] = self.pending.get(stream_id, 1) - 1

    def _encode_and_add(self, stream_id: str, first: int, frames: np.ndarray) -> None:
        if stream_id in self.undeleted:  # the id was taken again: its old thumbnails go first
            self.store.delete_stream(stream_id)
            self.undeleted.discard(stream_id)
        wanted = self.store.wanted(stream_id, first, len(frames))
        if wanted:
            self.store.add(stream_id, {f: encode_jpeg(frames[f - first]) for f in wanted})

    async def nearest(self, stream_id: str, frames: list[int]) -> list[Thumbnail | None]:
        """The kept thumbnails nearest `frames` (None each while the store cannot be read)."""
        try:
            return await asyncio.to_thread(self.store.nearest, stream_id, frames)
        except Exception as error:  # noqa: BLE001 - a view only (Redis down: the console shows none)
            log.warning("thumbnails of stream %r unreadable: %s: %s", stream_id, type(error).__name__, error)
            return [None] * len(frames)

    async def drop(self, stream_id: str) -> int:
        """Free the stream's thumbnails once its work in flight is done; how many there were. A
        store that cannot be reached (Redis down) never fails the deletion: its keys stay behind
        (bounded per stream) and the count is 0."""
        tail = self.tails.pop(stream_id, None)
        if tail is not None:
            await asyncio.wait([tail])
        self.pending.pop(stream_id, None)
        try:
            return await asyncio.to_thread(self.store.delete_stream, stream_id)
        except Exception as error:  # noqa: BLE001 - a view only, as in _write
            log.warning("thumbnails of stream %r not deleted yet: %s: %s", stream_id, type(error).__name__, error)
            self.undeleted.add(stream_id)
            self.spawn(self._delete_later(stream_id))
            return 0

    async def _delete_later(self, stream_id: str) -> None:
        """Try a refused deletion again, backing off, until the store takes it (or the id is taken
        again, whose first chunk deletes them)."""
        wait = RETRY_S[0]
        while stream_id in self.undeleted:
            await asyncio.sleep(wait)
            try:
                await asyncio.to_thread(self.store.delete_stream, stream_id)
                self.undeleted.discard(stream_id)
            except Exception:  # noqa: BLE001 - still down
                wait = min(2 * wait, RETRY_S[1])
