"""The answer pool: retrieval+decode actors that each hold a replica of every stream, questions
sent to the least busy one, and the pool grown under load and shrunk when idle (see
actors/coordinator.py's module doc)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from actors.calls import ACTOR_LOST, NAMESPACE, detached, snapshot_of, until_alive
from actors.recovery import RECOVERY_ATTEMPTS
from actors.stream_state import StreamState
from pipeline.errors import AnswerResumeError

log = logging.getLogger(__name__)


@dataclass(eq=False)
class AnswerReplica:
    """An answer actor of the pool and the streams it holds a replica of."""

    handle: Any
    name: str
    streams: set[str] = field(default_factory=set)
    ready: bool = False  # takes questions (a new actor first receives every stream)
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)



class AnswerPoolMixin:
    """StreamCoordinator's answer pool and questions."""

    def _new_answerer(self, ready: bool, name: str | None = None) -> AnswerReplica:
        name = name or next(self._answerer_names)
        return AnswerReplica(self._spawn("answerer", name, self.model_dir, self.device), name, ready=ready)

    def _named_answerers(self) -> list[int]:
        """Numbers of the answer actors named after this coordinator that exist (a previous
        process's)."""
        if not self.name:
            return []
        prefix = f"{self.name}.answerer"
        return sorted(int(a["name"][len(prefix):]) for a in ray.util.list_named_actors(all_namespaces=True)
                      if a["namespace"] == NAMESPACE and a["name"].startswith(prefix)
                      and a["name"][len(prefix):].isdigit())

    def pool(self) -> dict:
        """The answer pool: actors, questions in flight on each, scaling events so far."""
        return {"answerers": [{"name": r.name, "ready": r.ready, "in_flight": r.in_flight, "streams": len(r.streams)}
                              for r in self.answerers],
                "min": self.min_answerers, "max": self.max_answerers, **self.scaling_events}

    async def ask(self, stream_id: str, question: str, max_new_tokens: int = 64, sampling=None) -> dict:
        stream = self._live_stream(stream_id)
        with self._answer_slot() as replica:
            await self._prepare_question(stream, replica, question, max_new_tokens)
            # answers are read-only: decode outside the lock, so ingest goes on meanwhile
            return await self._on_answerer(
                stream, replica, lambda a: a.ask.remote(stream_id, question, max_new_tokens, sampling))

    async def ask_stream(self, stream_id: str, question: str, max_new_tokens: int = 64, sampling=None):
        """`ask` as it is generated (call with num_returns="streaming"): a dict with the evidence
        and prompt size, the answer text piece by piece, then a dict with the token ids. Errors
        in the question surface at the first item. An answer actor lost midway is recovered like
        `ask`'s and the answer resumes where it stopped: decoding is greedy or seeded
        (pipeline/sampling.py: the API seeds every sampled answer), so a replica holding
        the same updates generates the same items again, which are checked and skipped (if the
        stream took updates meanwhile, they differ, and the error is AnswerResumeError)."""
        stream = self._live_stream(stream_id)
        with self._answer_slot() as replica:
            await self._prepare_question(stream, replica, question, max_new_tokens)
            sent: list = []  # items yielded so far

            async def resume(answerer):
                """A new generation on `answerer`, read past the items already sent, and its next
                item (None if there is none)."""
                items = answerer.ask_stream.options(num_returns="streaming").remote(
                    stream_id, question, max_new_tokens, sampling)
                for old in sent:
                    if await (await items.__anext__()) != old:
                        raise AnswerResumeError(f"stream {stream_id!r} took updates since the answer began")
                try:
                    return items, await (await items.__anext__())
                except StopAsyncIteration:
                    return items, None

            for attempt in range(RECOVERY_ATTEMPTS):
                items, item = await self._on_answerer(stream, replica, resume)
                try:
                    while item is not None:
                        sent.append(item)
                        yield item
                        item = await (await items.__anext__())
                    return
                except StopAsyncIteration:
                    return
                except ACTOR_LOST:  # the next resume restores the replica (and counts the restart)
                    if attempt == RECOVERY_ATTEMPTS - 1:
                        raise

    async def _prepare_question(self, stream: StreamState, replica: AnswerReplica, question: str,
                                max_new_tokens: int) -> None:
        """Validate the question, close the open segment for it, and wait until every replica
        holds every update (so any replica answers from the whole stream)."""
        sid = stream.spec.stream_id
        await self._on_answerer(stream, replica, lambda a: a.check.remote(sid, question, max_new_tokens))
        await asyncio.shield(detached(self._close_open_segment(stream)))  # as in ingest: never half-done
        await self._published(stream)

    @contextlib.contextmanager
    def _answer_slot(self):
        """The least busy (then least recently used) ready answer actor, counted busy for the
        block; grows the pool when every actor is at its target."""
        replica = min((r for r in self.answerers if r.ready), key=lambda r: (r.in_flight, r.last_used))
        replica.in_flight += 1
        if self._idle_watch is None and self.max_answerers > self.min_answerers:  # (a pool adopted too)
            self._idle_watch = detached(self._remove_idle_answerers())
        if (self._scaling is None and len(self.answerers) < self.max_answerers
                and all(r.in_flight >= self.answer_target_ongoing for r in self.answerers if r.ready)):
            self._scaling = detached(self._add_answerer())
        try:
            yield replica
        finally:
            replica.in_flight -= 1
            replica.last_used = time.monotonic()

    def _holder(self, stream_id: str) -> AnswerReplica:
        """A ready answer actor holding the stream (a restarted one is restored on first use)."""
        return next((r for r in self.answerers if r.ready and stream_id in r.streams),
                    next(r for r in self.answerers if r.ready))

    async def _add_answerer(self) -> None:
        """Start an answer actor and give it a replica of every stream, one stream at a time
        under the stream's lock (so no update is committed meanwhile); updates committed after
        that reach it like any replica. It takes questions once it holds every stream."""
        replica = self._new_answerer(ready=False)
        self.answerers.append(replica)
        try:  # placed (an autoscaler may first add a node for it) and its model loaded
            await asyncio.wait_for(until_alive(replica.handle.ping.remote), self.answer_start_timeout_s)
            # until a pass finds none missing (streams created meanwhile open on ready actors
            # only), then ready with no await in between: no stream slips past it
            while missing := [s for s in self.streams.values() if s.spec.stream_id not in replica.streams]:
                for stream in missing:
                    sid = stream.spec.stream_id
                    async with stream.lock:
                        if stream.deleted or sid in replica.streams:
                            continue
                        await self._published(stream)
                        snapshot, applied = await self._on_answerer(stream, self._holder(sid),
                                                                    lambda a: snapshot_of(a, sid))
                        await replica.handle.restore.remote(stream.spec, snapshot, applied)
                        replica.streams.add(sid)
            replica.ready = True
            self.scaling_events["answerers_added"] += 1
        except Exception as error:  # a background task: nobody awaits it, so say why the pool did not grow
            unplaced = isinstance(error, asyncio.TimeoutError)
            self.scaling_events["answerers_unplaced"] += unplaced
            reason = f"was not placed within {self.answer_start_timeout_s:.0f} s" if unplaced else "could not be set up"
            log.warning("answer pool: a new answer actor %s", reason, exc_info=not unplaced)
            self.answerers.remove(replica)
            ray.kill(replica.handle, no_restart=True)
        finally:
            self._scaling = None

    async def _remove_idle_answerers(self) -> None:
        """Shrink the pool back towards `answerers`: remove actors idle for `answer_idle_s`."""
        while True:
            await asyncio.sleep(min(5.0, self.answer_idle_s / 4))
            now = time.monotonic()
            for replica in reversed(list(self.answerers)):  # the latest first: it may free the node added for it
                ready = [r for r in self.answerers if r.ready]
                if (len(ready) > self.min_answerers and replica.ready and not replica.in_flight
                        and now - replica.last_used > self.answer_idle_s):
                    self.answerers.remove(replica)  # no new questions or updates go to it
                    await asyncio.gather(*[self._published(s) for s in list(self.streams.values())])
                    ray.kill(replica.handle, no_restart=True)
                    self.scaling_events["answerers_removed"] += 1

