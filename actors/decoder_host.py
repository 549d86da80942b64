"""DecoderHost: one process decoding many streams' sources, each a `StreamDecoder` in threads of
its own (PyAV releases the GIL while it demuxes and decodes, so sources decode in parallel).

    host = decoder_host_class(capacity=32).remote(capacity=32)
    host.open.remote("cam1.3f2a", "cam1", "rtsp://...", DecodeConfig(fps=2), sink, 8, 2, "drop")
    host.start.remote("cam1.3f2a"); host.status.remote("cam1.3f2a"); host.drop.remote("cam1.3f2a")

Why: a process per source cost 130-180 MB each (the interpreter, Ray's worker, PyAV and numpy),
so a node held ~20 streams; a source on a host costs its thread, its codec context and the
chunks in flight to the sink. The pool that places sources on hosts is actors/decoder_pool.py.

Every call names its source by `key` (the pool's: stream id plus a random suffix, so a stream
that takes a new source never meets its previous one's calls) and behaves as the same call of
`StreamDecoder` (actors/decoder.py): chunks, seq, backpressure policies, push ordering, resync
after a coordinator restart, status fields. An unknown key raises `UnknownSourceError`.

A source whose decoding ended (finished, failed, stopped) is let go at once: its thread has
exited, and the host keeps only its final status (a small dict), which `status`, `wait`, `start`,
`stop` and `resync` answer from, until the coordinator `drop`s it. `drop` stops a source that
still runs and forgets it, then hands the freed pages back to the OS (malloc_trim). The pool
starts hosts with few malloc arenas (actors/release.py FEW_ARENAS): with glibc's default, the
freed memory of sources decoded by many short-lived threads stayed spread over up to 8 arenas
per core (BENCHMARKS.md "Stream churn").

Threads: the default concurrency group (open, start, status, stop, drop, resync, load, held,
watch) and "push" (push, close) and "wait" (wait) are sized by the host's capacity, so a blocked
push (its source's buffer full) or a long wait never delays another source's calls.

Sinks: every source of a host feeds the same coordinator. When a source's sink calls were lost
with the coordinator's process and no restarted one took over within reconnect_s (it is gone for
good), the host ends itself once none of its sources runs (it is detached: nothing else would).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import ray

from actors.decoder import StreamDecoder
from actors.messages import PushReceipt
from actors.release import release_freed_memory
from pipeline.errors import InvalidInputError

log = logging.getLogger(__name__)

__all__ = ["DecoderHost", "decoder_host_class", "UnknownSourceError"]


class UnknownSourceError(InvalidInputError):
    """The host holds no source of that key (never opened here, or dropped)."""


class _Ended:
    """What is kept of a source whose decoding ended: its final status, answering the calls a
    StreamDecoder answers (nothing to start, stop or send again; no more bytes taken)."""

    __slots__ = ("final",)

    def __init__(self, final: dict) -> None:
        self.final = final

    def status(self) -> dict:
        return dict(self.final)

    def start(self) -> dict:
        return self.status()

    def stop(self, timeout_s: float = 5.0) -> dict:
        return self.status()

    def wait(self, timeout_s: float | None = None) -> dict:
        return self.status()

    def resync(self) -> tuple[int, int]:
        return self.final["chunks_sent"], self.final["chunks_sent"]

    def push(self, chunk: bytes, seq: int | None = None, timeout_s: float | None = None) -> PushReceipt:
        raise InvalidInputError(f"stream {self.final['stream_id']!r} has ended ({self.final['state']}); push() refused")

    def close(self, chunks: int | None = None) -> None:
        return None


class DecoderHost:
    """Many sources' decoders in one process; see the module docstring. `capacity` is the number
    of running sources the pool places here (the host itself refuses none: the pool counts)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self._lock = threading.Lock()
        self._sources: dict[str, StreamDecoder | _Ended] = {}
        self._orphaned = False  # a source's sink was lost for good (see the module doc)
        self._watch = threading.Event()  # never set: watch() holds a call open until its timeout

    # --- the pool's calls ------------------------------------------------------------------------

    def open(self, key: str, stream_id: str, source: Any, config: Any, sink: Any, chunk_frames: int = 8,
             max_in_flight: int = 2, policy: str = "block", **options) -> int:
        """A new source under `key`, not started (StreamDecoder's arguments; its errors raised
        here); returns how many sources run here now, this one included."""
        decoder = StreamDecoder(stream_id, source, config, sink, chunk_frames, max_in_flight, policy,
                                on_end=self._ended, **options)
        with self._lock:
            if key in self._sources:
                raise InvalidInputError(f"decoder host: source key {key!r} is taken")
            self._sources[key] = decoder
            return self._running()

    def drop(self, key: str, timeout_s: float = 5.0) -> dict | None:
        """Stop the source (if it runs) and forget it; its final status, None if unknown."""
        with self._lock:
            entry = self._sources.get(key)
        if entry is None:
            return None
        final = entry.stop(timeout_s)
        with self._lock:
            self._sources.pop(key, None)
        del entry
        release_freed_memory()  # its buffers and codec: to the OS, not only to malloc (actors/release.py)
        return final

    def load(self) -> int:
        """How many sources run here (opened and not ended): what the pool fills up to capacity."""
        with self._lock:
            return self._running()

    def held(self) -> dict[str, dict]:
        """Every source this host holds, by key: its stream, state and whether it still holds a
        decode thread and buffers (a running source) or only its final status (an ended one)."""
        with self._lock:
            entries = dict(self._sources)
        return {key: {"stream_id": e.final["stream_id"] if isinstance(e, _Ended) else e.stream_id,
                      "state": e.status()["state"], "running": isinstance(e, StreamDecoder)}
                for key, e in entries.items()}

    def watch(self, timeout_s: float = 30.0) -> int:
        """Returns after `timeout_s` (with load()): the pool keeps one call open per host so it
        learns of the host's death at once (the call fails) without polling."""
        self._watch.wait(timeout_s)
        return self.load()

    # --- StreamDecoder's calls, by key -----------------------------------------------------------

    def start(self, key: str) -> dict:
        return self._get(key).start()

    def status(self, key: str) -> dict:
        return self._get(key).status()

    def stop(self, key: str, timeout_s: float = 5.0) -> dict:
        return self._get(key).stop(timeout_s)

    def resync(self, key: str) -> tuple[int, int]:
        return self._get(key).resync()

    @ray.method(concurrency_group="push")
    def push(self, key: str, chunk: bytes, seq: int | None = None, timeout_s: float | None = None) -> PushReceipt:
        return self._get(key).push(chunk, seq, timeout_s)

    @ray.method(concurrency_group="push")
    def close(self, key: str, chunks: int | None = None) -> None:
        return self._get(key).close(chunks)

    @ray.method(concurrency_group="wait")
    def wait(self, key: str, timeout_s: float | None = None) -> dict:
        return self._get(key).wait(timeout_s)

    # --- internals -------------------------------------------------------------------------------

    def _get(self, key: str) -> StreamDecoder | _Ended:
        with self._lock:
            entry = self._sources.get(key)
        if entry is None:
            raise UnknownSourceError(f"decoder host: no source {key!r} (dropped, or opened elsewhere)")
        return entry

    def _running(self) -> int:
        return sum(isinstance(e, StreamDecoder) and not e.ended for e in self._sources.values())

    def _ended(self, decoder: StreamDecoder, orphaned: bool) -> None:
        """A source's decode thread exits: keep its final status only (its buffers, pending
        chunks and codec go with the decoder object). Runs in that thread."""
        final = decoder.status()
        with self._lock:
            for key, entry in self._sources.items():
                if entry is decoder:
                    self._sources[key] = _Ended(final)
                    break
            self._orphaned = self._orphaned or orphaned
            end_now = self._orphaned and self._running() == 0
        if end_now:  # detached, and its coordinator is gone: nothing would ever end this host
            log.warning("decoder host: the coordinator did not come back; ending")
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


_CLASSES: dict[int, Any] = {}


def decoder_host_class(capacity: int):
    """The Ray actor class of a host for `capacity` sources: its thread pools are sized for them
    (concurrency groups are fixed when the class is made, not per actor)."""
    if capacity not in _CLASSES:
        _CLASSES[capacity] = ray.remote(
            max_restarts=0,  # a restarted host would hold none of its sources: the pool re-attaches them
            max_concurrency=max(8, capacity),  # default group: control calls and watch
            concurrency_groups={"push": max(2, 2 * capacity), "wait": max(4, capacity)},
        )(DecoderHost)
    return _CLASSES[capacity]
