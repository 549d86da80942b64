"""Deleted streams leave nothing behind (issue 23 item 4), with real Ray, PyAV and redis-server.

A named coordinator of its own, with its index and thumbnails in Redis, runs a few streams
through their whole lives in every way a stream is fed: a decoder reading a file, pushed bytes,
frames ingested directly, and a pushed source deleted while it still runs. Each one is checked
to have state everywhere first (index keys, thumbnails, decoder), so that the checks after the
deletions could fail: then no actor's per-stream table holds anything (the coordinator's streams,
answer pool, thumbnailer and creations; the prefill, compressor and answer actors' streams; the
index writer's journal), Redis holds no key naming them, their decoder actors are gone, and the
coordinator owns no more objects in the object store than before the first stream.
bench/churn.py measures the same over 200 streams.
"""

import contextlib
import time
import uuid

import numpy as np
import pytest
import ray
import redis

from actors.decoder_host import UnknownSourceError
from pipeline.sampling import GREEDY
from tests.stages import scene_video
from tests.test_http_api import mpegts

FRAMES = 12


def _inside(handle, function):
    """`function(actor instance)`, run in the actor (Ray's __ray_call__): the coordinator's own
    tables, which no method reports. The functions below are lambdas so that they travel by value:
    a module-level function would travel by reference and make the coordinator import this test
    module (and torch with its imports)."""
    return ray.get(handle.__ray_call__.remote(function))


coordinator_tables = lambda self: {  # noqa: E731 - by value, see _inside
    "streams": len(self.streams), "creating": len(self._creating),
    "answer_streams": sum(len(r.streams) for r in self.answerers),
    "thumbnail_tails": len(self.thumbnailer.tails), "thumbnail_pending": len(self.thumbnailer.pending),
    "thumbnails_undeleted": len(self.thumbnailer.undeleted), "vision_queue": len(self._vision.items)}
coordinator_pid = lambda self: __import__("os").getpid()  # noqa: E731
coordinator_imports = lambda self: {"torch", "transformers"} & set(__import__("sys").modules)  # noqa: E731


@pytest.fixture(scope="module")
def churn(ray_runtime, checkpoint_dirs, redis_server):
    """(coordinator handle, its name, a Redis client on its database)."""
    from deploy.ingest import named_coordinator, stop_coordinator

    name = f"churn-test-{uuid.uuid4().hex[:8]}"
    url = f"redis://127.0.0.1:{redis_server.port}/7"  # a database of its own
    handle = named_coordinator(name, checkpoint_dirs["gqa"], "cpu", 1, url, 0.05, num_cpus=0.05)
    ray.get(handle.list_streams.remote())
    client = redis.Redis.from_url(url)
    try:
        yield handle, name, client
    finally:
        stop_coordinator(name)


def owned_by(pid: int) -> int:
    from bench.procs import object_refs

    return object_refs()["workers"].get(pid, {}).get("owned", 0)


def page_owner_pid() -> int:
    from actors.calls import NAMESPACE

    owner = ray.get_actor(f"pages-{ray.get_runtime_context().get_node_id()}", namespace=NAMESPACE)
    return ray.get(owner.__ray_call__.remote(lambda self: __import__("os").getpid()))


def finished(handle, stream_id: str) -> dict:
    deadline = time.monotonic() + 120
    while (status := ray.get(handle.status.remote(stream_id)))["source_state"] not in ("finished", "failed"):
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    return status


def named_decoders(name: str) -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"{name}.decoder."))


def redis_keys(client, ids: list[str]) -> list[bytes]:
    return [k for k in client.scan_iter(count=1000) if any(sid.encode() in k for sid in ids)]


def test_deleted_streams_leave_no_state_keys_decoders_or_objects(churn, tmp_path):
    from pipeline.video_io import write_video

    handle, name, client = churn
    pid = _inside(handle, coordinator_pid)
    workers = ray.get(handle.workers.remote())
    actors = [workers["prefill"], workers["compressor"], *workers["answerers"]]
    # a stream through every actor first: what stays allocated after the first one (the models'
    # first use, caches) is not per stream
    ray.get(handle.create_stream.remote("warm"))
    ray.get(handle.ingest.remote("warm", scene_video(8, seed=9)))
    ray.get(handle.ask.remote("warm", "what colour is it?", 2))
    ray.get(handle.delete_stream.remote("warm"))
    owned_before = owned_by(pid)
    pages_pid = page_owner_pid()  # the node's KV pages' owner (actors/page_owner.py)
    pages_before = owned_by(pages_pid)

    clip = tmp_path / "clip.mp4"
    write_video(clip, scene_video(FRAMES, seed=1), fps=4.0)
    ids = ["file", "pushed", "direct", "cut"]
    for sid in ids:
        ray.get(handle.create_stream.remote(sid))
    ray.get(handle.attach_source.remote("file", str(clip)))
    ray.get(handle.attach_source.remote("pushed", None))
    ray.get(handle.push.remote("pushed", mpegts(scene_video(FRAMES, seed=2)), 0))
    ray.get(handle.close_source.remote("pushed", 60))
    ray.get(handle.ingest.remote("direct", scene_video(FRAMES, seed=3)))
    ray.get(handle.attach_source.remote("cut", None))  # deleted with its source still open
    ray.get(handle.push.remote("cut", mpegts(scene_video(FRAMES, seed=4)), 0))
    for sid in ("file", "pushed"):
        assert finished(handle, sid)["frames_ingested"] == FRAMES
    for sid in ("file", "pushed", "direct"):  # (asked as the HTTP replica asks: with sampling parameters)
        assert ray.get(handle.ask.remote(sid, "what colour is it?", 2, GREEDY))["text"] is not None
        assert ray.get(handle.index_keys.remote(sid)) > 0
        assert any(t is not None for t in ray.get(handle.thumbnails.remote(sid, [0])))
    workers = ray.get(handle.workers.remote())
    decoders, hosts = workers["decoders"], workers["decoder_hosts"]  # sources, on the pool's decoder hosts
    assert sorted(decoders) == ["cut", "file", "pushed"] and len(named_decoders(name)) == len(hosts) >= 1
    assert _inside(handle, coordinator_tables)["streams"] == 4
    assert all(t["streams"] == 4 for t in ray.get([a.tables.remote() for a in actors]))
    assert redis_keys(client, ids)
    # what passed through (sampling parameters too) left the coordinator torch-free: an import
    # there is held for good (~270 MB when pipeline.sampling imported torch)
    assert _inside(handle, coordinator_imports) == set()

    for sid in ids:
        ray.get(handle.delete_stream.remote(sid))

    assert ray.get(handle.list_streams.remote()) == [] and ray.get(handle.workers.remote())["decoders"] == {}
    assert set(_inside(handle, coordinator_tables).values()) == {0}, _inside(handle, coordinator_tables)
    for table in ray.get([a.tables.remote() for a in actors]):
        assert set(table.values()) == {0}, table  # streams, and the index writer's journal
    assert redis_keys(client, ids) == []
    for decoder in decoders.values():  # let go of by its host, not merely stopped
        with pytest.raises((UnknownSourceError, ray.exceptions.RayActorError)):
            ray.get(decoder.status.remote(), timeout=30)
    for host in hosts:
        with contextlib.suppress(ray.exceptions.RayActorError):  # (an idle host may be gone already)
            assert ray.get(host.held.remote(), timeout=30) == {}  # nothing of the deleted streams
    # references are released as the calls holding them end; the pool keeps one `watch` call
    # open on each decoder host still up (idle ones go after decoder_idle_s): its result is owned
    deadline = time.monotonic() + 30
    while True:
        watching = ray.get(handle.workers.remote())["decoder_pool"]["hosts"]
        if (owned := owned_by(pid)) <= owned_before + watching or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert owned <= owned_before + watching, \
        f"the coordinator still owns {owned - owned_before - watching} objects of deleted streams"
    deadline = time.monotonic() + 30  # the streams' KV pages: let go once no replica maps them
    while (pages := owned_by(pages_pid)) > pages_before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pages <= pages_before, f"the page owner still owns {pages - pages_before} pages of deleted streams"


def test_a_thumbnail_keeper_forgets_a_dropped_stream():
    """The thumbnailer's per-stream tables are empty once a stream is dropped, also when a chunk
    was refused for being too far behind, and when the store refused the deletion at first."""
    import asyncio

    from actors.thumbnailer import ThumbnailKeeper
    from cache_store.thumbnails import EmbeddedThumbnails

    class Flaky(EmbeddedThumbnails):
        refusals = 1

        def delete_stream(self, stream_id):
            if self.refusals:
                self.refusals -= 1
                raise ConnectionError("down")
            return super().delete_stream(stream_id)

    async def run():
        store = Flaky()
        keeper = ThumbnailKeeper(store, spawn=asyncio.ensure_future, max_pending=1)
        frames = np.zeros((4, 16, 16, 3), np.uint8)
        for first in range(0, 16, 4):  # the later chunks find one pending: skipped
            keeper.keep("s", first, frames)
        assert await keeper.drop("s") == 0  # refused: retried in the background
        for _ in range(100):
            if not keeper.undeleted:
                break
            await asyncio.sleep(0.05)
        return keeper, store

    import actors.thumbnailer as module

    retry, module.RETRY_S = module.RETRY_S, (0.01, 0.05)
    try:
        keeper, store = asyncio.run(run())
    finally:
        module.RETRY_S = retry
    assert (keeper.tails, keeper.pending, keeper.undeleted) == ({}, {}, set())
    assert store.frames("s") == [] and store._stride == {}
