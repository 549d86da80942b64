"""The coordinator's pool of decoder hosts (actors/decoder_host.py): where a stream's source is
decoded, and a handle to it with a single-stream decoder's call surface.

    pool = DecoderPool("coord", {"num_cpus": 0.05}, capacity=32, idle_s=60, on_lost=coordinator_callback)
    source = await pool.place("cam1", (url, config, sink, 8, 2, "drop"), {"time_offset": 0.0}, timeout_s=30)
    await source.start.remote(); await source.status.remote()      # as a DecoderActor's calls
    await pool.drop(source)                                         # stop it, forget it

Placement: a source goes to the host with the most running sources that still has room
(`capacity` running sources), so hosts fill one after another and the ones whose streams were
deleted empty out; when every host is full a new one is started (the pool grows with load, and
on a cluster the autoscaler adds a decoder node when none has room for it). Loads are asked of
the hosts at each placement (a source that finished no longer counts). A host with no source
left for `idle_s` is removed.

Under a named coordinator the hosts are named after it ("<coordinator>.decoder.<id>") and
detached, so they outlive its process; a restarted process adopts them (`adopt_blocking`) and
finds each stream's source by the name its SourceNote kept ("<host>/<key>").

A host's death: the pool keeps one `watch` call open per host, which fails at once when the
host's process dies; `on_lost(keys)` then tells the coordinator which sources went with it (it
attaches live pulls and open uploads again on another host: actors/sources.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError

from actors.calls import ACTOR_LOST, NAMESPACE, UNDO_TIMEOUT_S, awaited, bounded, detached
from actors.decoder_host import decoder_host_class
from actors.release import FEW_ARENAS, with_env

log = logging.getLogger(__name__)

__all__ = ["DecoderPool", "SourceHandle", "default_capacity"]
LOAD_TIMEOUT_S = 5.0  # a host that does not say its load within it takes no new source this time
WATCH_S = 30.0  # how long each watch call stays open (a dead coordinator's open calls end by then)


def default_capacity() -> int:
    """Running sources per host: 16 per CPU of this node. A source decodes in a thread of its
    own and PyAV releases the GIL while decoding, so a host uses several cores; live sources
    sampled at a few fps need a small fraction of one each (BENCHMARKS.md, decoder pool)."""
    import os

    return 16 * max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class _Method:
    """`handle.<method>.remote(*args)` for one source: the host's method with the source's key."""

    def __init__(self, host, method: str, key: str) -> None:
        self._host, self._method, self._key = host, method, key

    def remote(self, *args, **kwargs) -> ray.ObjectRef:
        return getattr(self._host, self._method).remote(self._key, *args, **kwargs)


@dataclass(frozen=True, eq=False)
class SourceHandle:
    """One source on one host, called as a single-stream decoder actor is (start, status, stop,
    wait, resync, push, close: `handle.status.remote()` gives an ObjectRef). Picklable: tests and
    operators get it from `workers()`."""

    host: Any  # the DecoderHost's actor handle
    key: str  # the source's key on it
    host_name: str | None = None  # the host's actor name (a named coordinator's), else None

    @property
    def name(self) -> str | None:
        """What a SourceNote keeps to find the source again after a coordinator restart."""
        return None if self.host_name is None else f"{self.host_name}/{self.key}"

    start = property(lambda self: _Method(self.host, "start", self.key))
    status = property(lambda self: _Method(self.host, "status", self.key))
    stop = property(lambda self: _Method(self.host, "stop", self.key))
    wait = property(lambda self: _Method(self.host, "wait", self.key))
    resync = property(lambda self: _Method(self.host, "resync", self.key))
    push = property(lambda self: _Method(self.host, "push", self.key))
    close = property(lambda self: _Method(self.host, "close", self.key))


@dataclass(eq=False)
class _Host:
    id: str
    handle: Any
    name: str | None  # its actor name when named
    keys: set[str] = field(default_factory=set)  # sources placed on it, not dropped (ended ones too)
    running: int = 0  # sources running, as it last said
    opening: int = 0  # placements on their way to it
    ready: bool = False  # it answered once
    gone: bool = False  # removed (idle, shut down) or dead
    idle_since: float | None = None  # when it was left without a source
    watching: asyncio.Task | None = None

    def source(self, key: str) -> SourceHandle:
        return SourceHandle(self.handle, key, self.name)


class DecoderPool:
    """See the module docstring. `prefix`: the named coordinator's name (hosts named and
    detached), or None. `options`: Ray options of a host (num_cpus, resources). `on_lost(keys)`:
    awaited when a host dies, with the keys of the sources it held."""

    def __init__(self, prefix: str | None, options: dict, capacity: int, idle_s: float,
                 on_lost: Callable[[list[str]], Awaitable[None]]) -> None:
        if capacity < 1 or idle_s <= 0:
            raise ValueError("decoder capacity must be >= 1 and idle_s > 0")
        self.prefix, self.options, self.capacity, self.idle_s = prefix, dict(options), int(capacity), float(idle_s)
        self.on_lost = on_lost
        self.hosts: dict[str, _Host] = {}
        self.events = {"hosts_started": 0, "hosts_removed": 0, "hosts_lost": 0}

    # --- placing and dropping sources ------------------------------------------------------------

    async def place(self, stream_id: str, args: tuple, kwargs: dict, timeout_s: float) -> SourceHandle:
        """Open a source (StreamDecoder's arguments after the stream id) on a host with room, or
        on a new host; within `timeout_s` (CapacityError), a new host that could not be placed
        is removed, as on any failure or cancellation."""
        await self._refresh()
        host, key = self._reserve(stream_id)
        self.watch_all()  # a new host too
        with self._opening(host, key):
            host.running = await bounded(host.handle.open.remote(key, stream_id, *args, **kwargs), timeout_s,
                                         "no room for the stream's decoder")
        return host.source(key)

    def place_blocking(self, stream_id: str, args: tuple, kwargs: dict, timeout_s: float) -> SourceHandle:
        """place, for a restarted coordinator's __init__ (no event loop calls yet)."""
        for host in self._live():
            with contextlib.suppress(GetTimeoutError, *ACTOR_LOST):
                host.running = ray.get(host.handle.load.remote(), timeout=LOAD_TIMEOUT_S)
        host, key = self._reserve(stream_id)
        with self._opening(host, key):
            host.running = ray.get(host.handle.open.remote(key, stream_id, *args, **kwargs), timeout=timeout_s)
        return host.source(key)

    @contextlib.contextmanager
    def _opening(self, host: _Host, key: str):
        """An open of a reserved source: the host is ready once it succeeds; on any failure or
        cancellation the reservation is undone (_unreserve)."""
        try:
            yield
            host.ready = True
        except BaseException:
            self._unreserve(host, key)
            raise
        finally:
            host.opening -= 1

    async def drop(self, source: SourceHandle | None, timeout_s: float = UNDO_TIMEOUT_S) -> None:
        """Stop the source and let it go (its host frees it); a host left with none is removed
        after idle_s. A host that does not answer or is dead: forgotten anyway."""
        if source is None:
            return
        with contextlib.suppress(asyncio.TimeoutError, *ACTOR_LOST):
            await asyncio.wait_for(awaited(source.host.drop.remote(source.key)), timeout_s)
        host = self._host_of(source)
        if host is not None:
            host.keys.discard(source.key)
            self._maybe_idle(host)

    def forget_unclaimed(self, claimed: set[str]) -> None:
        """After a takeover: drop the sources no stream claims (an attach cut short by the old
        process's death), without waiting."""
        for host in self._live():
            for key in host.keys - claimed:
                host.handle.drop.remote(key)
                host.keys.discard(key)

    def shutdown(self) -> None:
        """Remove every host for good (the coordinator's shutdown)."""
        for host in list(self.hosts.values()):
            self._remove(host)

    def existing(self, name: str | None) -> SourceHandle | None:
        """The source a SourceNote names ("<host>/<key>") if its host was adopted and holds it."""
        if not name or "/" not in name:
            return None
        host_name, key = name.split("/", 1)
        host = next((h for h in self._live() if h.name == host_name), None)
        return host.source(key) if host is not None and key in host.keys else None

    def handles(self) -> list:
        return [h.handle for h in self._live()]

    def stats(self) -> dict:
        live = self._live()
        return {"hosts": len(live), "capacity": self.capacity, "sources": sum(len(h.keys) for h in live),
                "running": sum(h.running for h in live), **self.events}

    # --- a restarted coordinator -----------------------------------------------------------------

    def adopt_blocking(self) -> None:
        """Take over the hosts a previous process of this named coordinator started (blocking:
        its __init__). A host that does not answer is left out (its sources count as lost)."""
        if self.prefix is None:
            return
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == NAMESPACE and a["name"].startswith(f"{self.prefix}.decoder.")]
        for name in names:
            try:
                handle = ray.get_actor(name, namespace=NAMESPACE)
                held = ray.get(handle.held.remote(), timeout=30)
            except (ValueError, GetTimeoutError, *ACTOR_LOST):
                continue
            host = _Host(name.rsplit(".", 1)[-1], handle, name, set(held), ready=True,
                         running=sum(h["running"] for h in held.values()))
            self.hosts[host.id] = host

    def watch_all(self) -> None:
        """Watch every host not yet watched (needs the event loop: not from __init__)."""
        for host in self._live():
            if host.watching is None:
                host.watching = detached(self._watch(host))
            if not host.keys and host.idle_since is None:  # (an adopted host without sources)
                self._maybe_idle(host)

    # --- internals -------------------------------------------------------------------------------

    def _live(self) -> list[_Host]:
        return [h for h in self.hosts.values() if not h.gone]

    def _host_of(self, source: SourceHandle) -> _Host | None:
        return next((h for h in self._live() if source.key in h.keys), None)

    async def _refresh(self) -> None:
        """Ask each ready host its load (bounded): ended sources no longer count."""
        hosts = [h for h in self._live() if h.ready]
        replies = await asyncio.gather(*[asyncio.wait_for(awaited(h.handle.load.remote()), LOAD_TIMEOUT_S)
                                         for h in hosts], return_exceptions=True)
        for host, reply in zip(hosts, replies):
            host.running = reply if isinstance(reply, int) else self.capacity  # no answer: no room now

    def _reserve(self, stream_id: str) -> tuple[_Host, str]:
        """The host with the most running sources that has room (or a new one), with a new key
        reserved on it; no await in here, so concurrent placements see each other."""
        room = [h for h in self._live() if h.running + h.opening < self.capacity]
        host = max(room, key=lambda h: h.running + h.opening) if room else self._start_host()
        key = f"{stream_id}.{uuid.uuid4().hex[:8]}"
        host.keys.add(key)
        host.idle_since = None
        host.opening += 1
        return host, key

    def _unreserve(self, host: _Host, key: str) -> None:
        """A placement that failed: the source goes (the open may have run), and a new host that
        never answered is removed (it may wait for room the cluster lacks: no orphan)."""
        host.keys.discard(key)
        if not host.ready and not host.keys and host.opening <= 1:
            self._remove(host)
        elif not host.gone:
            host.handle.drop.remote(key)
            self._maybe_idle(host)

    def _start_host(self) -> _Host:
        host_id = uuid.uuid4().hex[:8]
        options = with_env({"num_cpus": 0.05, **self.options}, FEW_ARENAS)
        name = None
        if self.prefix:
            name = f"{self.prefix}.decoder.{host_id}"
            options.update(name=name, namespace=NAMESPACE, lifetime="detached")
        handle = decoder_host_class(self.capacity).options(**options).remote(self.capacity)
        host = self.hosts[host_id] = _Host(host_id, handle, name)
        self.events["hosts_started"] += 1
        return host

    def _remove(self, host: _Host) -> None:
        host.gone = True
        self.hosts.pop(host.id, None)
        if host.watching is not None:
            host.watching.cancel()
        ray.kill(host.handle, no_restart=True)

    def _maybe_idle(self, host: _Host) -> None:
        """Remove the host if it is still without a source idle_s from now."""
        if host.keys or host.gone:
            return
        since = time.monotonic()
        host.idle_since = since

        def retire() -> None:
            if not host.keys and not host.gone and host.opening == 0 and host.idle_since == since:
                self.events["hosts_removed"] += 1
                self._remove(host)

        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().call_later(self.idle_s, retire)

    async def _watch(self, host: _Host) -> None:
        """Hold a watch call open on the host, again and again; when one fails because the host
        died, forget the host and tell the coordinator which sources went with it."""
        while not host.gone:
            try:
                host.running = await host.handle.watch.remote(WATCH_S)
                host.ready = True
            except ACTOR_LOST:
                if host.gone:
                    return
                host.gone = True
                self.hosts.pop(host.id, None)
                self.events["hosts_lost"] += 1
                log.warning("decoder host %s died with %d source(s)", host.name or host.id, len(host.keys))
                await self.on_lost(sorted(host.keys))
                return
            except Exception:  # noqa: BLE001 - e.g. the watch call refused: look again shortly
                log.debug("decoder host %s: watch failed", host.id, exc_info=True)
                await asyncio.sleep(1.0)

