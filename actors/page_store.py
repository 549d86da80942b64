"""PageStore: the long-lived owner of KV pages, as a Ray actor.

Why an actor. A Ray object belongs to the worker that created it and is lost when that worker
dies (`ray.put(_owner=...)` is gone). Pages made by a prefill or compressor actor must outlive
it, so producers hand them to this store, which keeps its OWN copy: `put` copies the incoming
arrays (they arrive as read-only views of the producer's object-store buffers) into the store's
heap. After `put` returns, the producer may die, be killed or restart without losing anything.

Keys. A page is identified by `(stream_id, unit_id, kind, layers)` from its header (see
`page_key`). `put` of a page whose key is already stored with the same content hash is a no-op
(idempotent, so producers may retry); with a different content hash the new page replaces the
old one (a re-computed block).

Reads. `get` returns `KVPage`s ordered by (unit_id, kind in `KINDS` order, layers). Returned
numpy arrays travel zero-copy through the object store and arrive READ-ONLY on the caller;
`KVPage.to_tensors()` copies once where a writable tensor is needed.

Durability (opt-in). With `spill_dir`, every stored page is also written to disk
(`KVPage.to_bytes()`, written to a temporary name then renamed, so a crash never leaves a half
page), `drop`/`delete_stream` remove the files, and a new store on the same directory (a restarted
actor: `max_restarts`, or a replacement after `ray.kill`) reloads and verifies them. Corrupt files
are skipped and counted in `stats()["spill_skipped"]`. WITHOUT `spill_dir` the pages live only in
the actor's memory: the store must not be killed or restarted while its pages are needed
(`PageStoreActor` has `max_restarts=0`; with a `spill_dir`, pass `.options(max_restarts=-1,
max_task_retries=-1)` — calls are idempotent, so retries are safe).

Concurrency. A threaded actor (`max_concurrency=8`): reads are answered while a large put is
being copied; the page map is guarded by a lock, and stored pages are never modified in place.

Typical deployment (the lead's choice of name/namespace):
    store = PageStoreActor.options(name="page_store", lifetime="detached",
                                   get_if_exists=True).remote(spill_dir=...)
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import ray

from cache_store.pages import KINDS, KVPage
from pipeline.errors import InvalidInputError, PageCorruptError, UnknownStreamError

log = logging.getLogger(__name__)

PageKey = tuple[int, str, tuple[int, int]]  # (unit_id, kind, layers) inside one stream
_KIND_ORDER = {k: i for i, k in enumerate(KINDS)}
_SUFFIX = ".kvp"

__all__ = ["PageStore", "PageStoreActor", "page_key", "UnknownStreamError"]


def page_key(page: KVPage) -> tuple[str, int, str, tuple[int, int]]:
    """The store key of a page: (stream_id, unit_id, kind, layers)."""
    h = page.header
    return h.stream_id, h.unit_id, h.kind, h.layers


def _order(key: PageKey) -> tuple:
    unit_id, kind, layers = key
    return unit_id, _KIND_ORDER.get(kind, len(KINDS)), layers


def _owned(page: KVPage) -> KVPage:
    """The page with arrays the store owns: heap copies, independent of the producer's
    object-store buffers, and marked read-only (stored pages are never modified in place)."""
    keys, values = np.array(page.keys, copy=True), np.array(page.values, copy=True)
    keys.setflags(write=False)
    values.setflags(write=False)
    return KVPage(page.header, keys, values)


class PageStore:
    """KV pages of many streams, keyed by (stream_id, unit_id, kind, layers).

    Plain class (usable in-process); `PageStoreActor` is the Ray actor. See the module docstring
    for ownership, idempotence, ordering, durability and concurrency.
    """

    def __init__(self, spill_dir: str | os.PathLike | None = None, verify_on_put: bool = False) -> None:
        self._lock = threading.RLock()
        self._streams: dict[str, dict[PageKey, KVPage]] = {}
        self._verify_on_put = verify_on_put
        self._spill = Path(spill_dir) if spill_dir is not None else None
        self._spill_loaded = 0
        self._spill_skipped = 0
        if self._spill is not None:
            self._spill.mkdir(parents=True, exist_ok=True)
            self._reload()

    # --- writes ----------------------------------------------------------------------------------

    def put(self, pages: Iterable[KVPage]) -> int:
        """Store pages; returns how many were new or replaced a different version (0 for pages
        already stored with the same content hash)."""
        incoming = list(pages)
        for page in incoming:
            if not isinstance(page, KVPage):
                raise InvalidInputError(f"PageStore.put expects KVPage objects, got {type(page).__name__}")
            if self._verify_on_put:
                page.verify()
        changed = 0
        for page in incoming:
            stream_id, *rest = page_key(page)
            key: PageKey = tuple(rest)  # type: ignore[assignment]
            with self._lock:
                old = self._streams.get(stream_id, {}).get(key)
            if old is not None and old.header.content_hash == page.header.content_hash:
                continue
            owned = _owned(page)  # copy outside the lock: reads go on meanwhile
            with self._lock:
                pages_of = self._streams.setdefault(stream_id, {})
                old = pages_of.get(key)
                if old is not None and old.header.content_hash == page.header.content_hash:
                    continue  # a concurrent put of the same page won
                if self._spill is not None:
                    self._write(owned)
                pages_of[key] = owned
                changed += 1
        return changed

    def drop(self, stream_id: str, unit_ids: Iterable[int], kinds: Iterable[str] | None = None) -> int:
        """Remove the pages of `unit_ids` (all kinds, or only `kinds`); returns how many were
        removed. Unknown streams and absent pages count 0. The stream stays known (an emptied
        stream's `get` returns [])."""
        units = {int(u) for u in unit_ids}
        kind_set = None if kinds is None else set(kinds)
        with self._lock:
            pages_of = self._streams.get(stream_id)
            if not pages_of:
                return 0
            gone = [k for k in pages_of if k[0] in units and (kind_set is None or k[1] in kind_set)]
            for key in gone:
                page = pages_of.pop(key)
                if self._spill is not None:
                    self._unlink(page)
            return len(gone)

    def delete_stream(self, stream_id: str) -> int:
        """Forget a stream and free its pages; returns how many pages were freed (0 if unknown)."""
        with self._lock:
            pages_of = self._streams.pop(stream_id, None)
            if pages_of is None:
                return 0
            if self._spill is not None:
                for page in pages_of.values():
                    self._unlink(page)
                try:
                    self._stream_dir(stream_id).rmdir()
                except OSError:
                    pass
            return len(pages_of)

    # --- reads -----------------------------------------------------------------------------------

    def get(self, stream_id: str, unit_ids: Iterable[int] | None = None,
            kinds: Iterable[str] | None = None) -> list[KVPage]:
        """Pages of a stream ordered by (unit_id, kind, layers), optionally only `unit_ids` and
        `kinds`; absent units are skipped. Raises UnknownStreamError for a stream never put (or
        deleted)."""
        units = None if unit_ids is None else {int(u) for u in unit_ids}
        kind_set = None if kinds is None else set(kinds)
        with self._lock:
            pages_of = self._streams.get(stream_id)
            if pages_of is None:
                raise UnknownStreamError(f"no pages stored for stream {stream_id!r}")
            keys = [k for k in pages_of if (units is None or k[0] in units)
                    and (kind_set is None or k[1] in kind_set)]
            keys.sort(key=_order)
            return [pages_of[k] for k in keys]

    def count(self, stream_id: str | None = None) -> int:
        """Pages stored for one stream (0 if unknown), or in all streams."""
        with self._lock:
            if stream_id is not None:
                return len(self._streams.get(stream_id, {}))
            return sum(len(p) for p in self._streams.values())

    def nbytes(self, stream_id: str | None = None) -> int:
        """Bytes of keys + values stored for one stream (0 if unknown), or in all streams."""
        with self._lock:
            groups = [self._streams.get(stream_id, {})] if stream_id is not None else list(self._streams.values())
            return sum(page.nbytes for pages_of in groups for page in pages_of.values())

    def streams(self) -> list[str]:
        """Known stream ids, sorted."""
        with self._lock:
            return sorted(self._streams)

    def stats(self) -> dict:
        with self._lock:
            return {
                "streams": len(self._streams),
                "pages": sum(len(p) for p in self._streams.values()),
                "nbytes": sum(pg.nbytes for p in self._streams.values() for pg in p.values()),
                "pid": os.getpid(),  # changes when the actor restarts
                "spill_dir": str(self._spill) if self._spill is not None else None,
                "spill_loaded": self._spill_loaded,
                "spill_skipped": self._spill_skipped,
            }

    def ping(self) -> bool:
        return True

    # --- durable spill ---------------------------------------------------------------------------

    def _stream_dir(self, stream_id: str) -> Path:
        # Stream ids are arbitrary text: name the folder by a hash; headers carry the real id.
        return self._spill / hashlib.blake2b(stream_id.encode(), digest_size=16).hexdigest()

    def _path(self, page: KVPage) -> Path:
        h = page.header
        return self._stream_dir(h.stream_id) / f"{h.unit_id}.{h.kind}.{h.layers[0]}-{h.layers[1]}{_SUFFIX}"

    def _write(self, page: KVPage) -> None:
        path = self._path(page)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(page.to_bytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _unlink(self, page: KVPage) -> None:
        try:
            self._path(page).unlink()
        except FileNotFoundError:
            pass

    def _reload(self) -> None:
        for path in sorted(self._spill.glob(f"*/*{_SUFFIX}")):
            try:
                with open(path, "rb") as f:
                    data = f.read()
                page = KVPage.from_bytes(data)  # arrays: read-only views of `data`, like stored pages
                if path != self._path(page):
                    raise PageCorruptError(f"page {page_key(page)} stored under the wrong name")
            except (OSError, PageCorruptError) as exc:
                self._spill_skipped += 1
                log.warning("page store: skipping %s: %s", path, exc)
                continue
            stream_id, *rest = page_key(page)
            self._streams.setdefault(stream_id, {})[tuple(rest)] = page
            self._spill_loaded += 1
        for tmp in self._spill.glob("*/*.tmp*"):  # writes cut short by a crash
            tmp.unlink(missing_ok=True)


# Control calls (count, streams, stats) answer while a large put/get is being copied.
PageStoreActor = ray.remote(num_cpus=0.05, max_concurrency=8, max_restarts=0)(PageStore)
