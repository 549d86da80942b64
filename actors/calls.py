"""How the coordinator calls its actors: tasks detached from the caller, bounded waits, the one
retry helper (`until_alive`, also used by deploy/client.py), snapshots by reference, and the
coalescer that batches queued work.

Kept free of torch and transformers: every decoder actor imports the coordinator's modules.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Iterator
from typing import Any

import ray
from ray.exceptions import RayActorError

from pipeline.errors import CapacityError

# An actor call failed because its actor died or is restarting (ActorDiedError and
# ActorUnavailableError are both RayActorErrors)
ACTOR_LOST = (RayActorError,)
# Deployments' named coordinators live here, and their model actors, named "<coordinator>.<kind>"
# (an actor cannot read the namespace it was created in)
NAMESPACE = "streamkv"
# How long creating a stream (or attaching a source) waits for the actors it needs to answer: a
# decoder the cluster cannot place, a model actor that is restarting or unplaceable. Past it the
# half-made stream is undone and the caller gets CapacityError (HTTP 503 with Retry-After).
START_TIMEOUT_S = 30.0
# How long undoing (closing a half-made stream, stopping a decoder) waits for each actor; calls
# not answered by then still run in order after the ones they undo
UNDO_TIMEOUT_S = 10.0


def _delays(timeout_s: float, first_s: float, max_s: float) -> Iterator[float]:
    """The waits between attempts: doubling from `first_s` to `max_s`, while `timeout_s` lasts."""
    deadline, delay = time.monotonic() + timeout_s, first_s
    while time.monotonic() + delay <= deadline:
        yield delay
        delay = min(2 * delay, max_s)


async def until_alive(call, timeout_s: float = 300.0, errors: tuple = ACTOR_LOST, max_delay_s: float = 2.0):
    """`await call()`, made again while its actor restarts (a Ray restart takes seconds), for up
    to `timeout_s`. The one retry policy of the Ray side. Only for calls that may run twice: one
    in flight when the actor died may have run."""
    delays = _delays(timeout_s, 0.1, max_delay_s)
    while True:
        try:
            return await call()
        except errors:
            delay = next(delays, None)
            if delay is None:
                raise
            await asyncio.sleep(delay)


def until_alive_blocking(call, timeout_s: float = 300.0):
    """`ray.get(call())` as until_alive, for code that must block (an actor's __init__)."""
    delays = _delays(timeout_s, 0.1, 2.0)
    while True:
        try:
            return ray.get(call())
        except ACTOR_LOST:
            delay = next(delays, None)
            if delay is None:
                raise
            time.sleep(delay)


def detached(coroutine) -> asyncio.Task:
    """Run `coroutine` as a task of its own, outside the caller's Ray task context (a caller that
    awaits it shields it too). A caller that goes away (ray.cancel, recursive by default) cancels
    the actor calls submitted in its context, and a model actor's call that is already running
    then still runs to the end but reports TaskCancelledError: its effect (a segment flushed, an
    update applied) would be done yet unknown to the coordinator. So stream work runs in these
    tasks."""
    return asyncio.get_running_loop().create_task(coroutine, context=contextvars.Context())


async def settled(refs) -> list[tuple[ray.ObjectRef, Any]]:
    """A call's return objects (one ref, or a list with num_returns), each with its value, once
    the call is done (its errors raised here). This actor owns the objects its calls return, so
    they outlive the actor that made them; awaiting a value also pulls a copy to this node, which
    Ray recovers the object from if the maker's node is lost while the copy is held."""
    refs = list(refs) if isinstance(refs, list) else [refs]
    return list(zip(refs, await asyncio.gather(*refs)))


async def awaited(ref):
    """`await ref` as a coroutine (for asyncio.wait_for / wait)."""
    return await ref


async def bounded(awaitable, timeout_s: float, what: str):
    """`awaitable` within `timeout_s`; past it CapacityError (`what`: why, for the caller)."""
    try:
        return await asyncio.wait_for(awaited(awaitable), timeout_s)
    except asyncio.TimeoutError:
        raise CapacityError(f"{what} within {timeout_s:g} s: the cluster has no room now; retry later",
                            retry_after_s=max(1.0, min(timeout_s, 30.0))) from None


def snapshot_refs(handle, stream_id: str) -> list[ray.ObjectRef]:
    """A replica's snapshot and how many updates it holds, as two references: the snapshot goes
    to the actor it restores through the object store, not through this process."""
    return handle.snapshot.options(num_returns=2).remote(stream_id)


async def snapshot_of(handle, stream_id: str) -> tuple[ray.ObjectRef, int]:
    """snapshot_refs once the snapshot is taken (its errors raised here), with the count's value."""
    snapshot, applied = snapshot_refs(handle, stream_id)
    return snapshot, await applied



def groups(items: list, sizes: list[int], limit: int):
    """Consecutive groups of `items` whose sizes add up to at most `limit` (an item larger than
    that alone)."""
    group, total = [], 0
    for item, size in zip(items, sizes):
        if group and total + size > limit:
            yield group
            group, total = [], 0
        group.append(item)
        total += size
    if group:
        yield group



class Coalescer:
    """Hands everything queued so far to `drain` in one call, one call at a time, in queue order:
    items that queue up behind a running call go together into the next one (batching under
    load), and an item queued while nothing runs goes at once (no added latency)."""

    def __init__(self, drain):
        self.drain, self.items, self.running = drain, [], None

    def put(self, item) -> None:
        self.items.append(item)
        if self.running is None or self.running.done():
            self.running = detached(self._run())  # it serves every caller that queued, not only this one

    async def _run(self) -> None:
        while self.items:
            batch, self.items = self.items, []
            await self.drain(batch)

