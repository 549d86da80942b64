"""PageStore as a real Ray actor: keys, idempotence, drop/delete accounting, ownership of pages
whose producer was killed, typed errors, multi-MB pages, and the opt-in durable spill across an
actor restart."""

from __future__ import annotations

import time
import zlib

import numpy as np
import pytest
import ray
import torch

from actors.page_store import PageStore, PageStoreActor, page_key
from cache_store.pages import KVPage
from pipeline.errors import InvalidInputError, UnknownStreamError

MODEL = "tiny-test"


def make_page(stream_id: str, unit_id: int, kind: str = "frame", *, layers=(0, 2), heads: int = 2,
              tokens: int = 4, head_dim: int = 8, seed: int = 0, dtype=torch.bfloat16) -> KVPage:
    g = torch.Generator().manual_seed(zlib.crc32(repr((stream_id, unit_id, kind, layers, seed)).encode()))
    shape = (layers[1] - layers[0], heads, tokens, head_dim)
    keys = torch.randn(shape, generator=g).to(dtype)
    values = torch.randn(shape, generator=g).to(dtype)
    return KVPage.from_tensors(keys, values, model_id=MODEL, stream_id=stream_id, unit_id=unit_id,
                               frame_range=(unit_id, unit_id + 1), time_range=(unit_id * 0.5, unit_id * 0.5 + 0.5),
                               positions=(unit_id * tokens, tokens), kind=kind, layers=layers)


def same(a: KVPage, b: KVPage) -> bool:
    return (a.header == b.header and np.array_equal(a.keys, b.keys) and np.array_equal(a.values, b.values))


@pytest.fixture(scope="module")
def spill_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("page_store") / "pages"


@pytest.fixture(scope="module")
def store(ray_runtime, spill_dir):
    # One store for the module (each actor start costs seconds on 2 cores), with the opt-in spill,
    # restartable once: the last test kills it and checks what the restarted store reloads.
    actor = PageStoreActor.options(max_restarts=1, max_task_retries=-1).remote(spill_dir=str(spill_dir))
    yield actor
    ray.kill(actor)


def test_put_get_idempotence_drop_delete(store):
    sid = "cam-basic"
    pages = [make_page(sid, u, kind) for u in (3, 1, 2, 0) for kind in ("frame", "summary")]
    pages.append(make_page(sid, 1, "frame", layers=(2, 4)))  # same unit and kind, other layers
    assert ray.get(store.put.remote(pages)) == 9
    assert ray.get(store.put.remote(pages[:4])) == 0  # same pages again: kept once
    assert ray.get(store.count.remote(sid)) == 9
    per_page = pages[0].nbytes
    assert ray.get(store.nbytes.remote(sid)) == 9 * per_page
    assert sid in ray.get(store.streams.remote())

    got = ray.get(store.get.remote(sid))
    assert [page_key(p)[1:] for p in got] == [
        (0, "frame", (0, 2)), (0, "summary", (0, 2)),
        (1, "frame", (0, 2)), (1, "frame", (2, 4)), (1, "summary", (0, 2)),
        (2, "frame", (0, 2)), (2, "summary", (0, 2)),
        (3, "frame", (0, 2)), (3, "summary", (0, 2)),
    ]
    by_key = {page_key(p): p for p in pages}
    for page in got:
        assert same(page, by_key[page_key(page)])
        page.verify()
        keys, values = page.to_tensors()
        assert keys.dtype == torch.bfloat16 and keys.shape == page.header.shape

    subset = ray.get(store.get.remote(sid, [2, 0, 7], ("summary",)))
    assert [page_key(p)[1:3] for p in subset] == [(0, "summary"), (2, "summary")]

    # A re-computed page (same key, other content) replaces the old one.
    redo = make_page(sid, 2, "summary", seed=1)
    assert ray.get(store.put.remote([redo])) == 1
    assert ray.get(store.count.remote(sid)) == 9
    assert same(ray.get(store.get.remote(sid, [2], ("summary",)))[0], redo)

    assert ray.get(store.drop.remote(sid, [1], ("frame",))) == 2
    assert ray.get(store.drop.remote(sid, [1], ("frame",))) == 0
    assert ray.get(store.drop.remote(sid, [0, 3])) == 4
    assert ray.get(store.count.remote(sid)) == 3
    assert ray.get(store.nbytes.remote(sid)) == 3 * per_page
    assert ray.get(store.drop.remote("cam-never", [0])) == 0

    other = "cam-basic-other"
    ray.get(store.put.remote([make_page(other, 0)]))
    total = ray.get(store.count.remote())
    assert total >= 4 and ray.get(store.nbytes.remote()) >= 4 * per_page
    assert ray.get(store.delete_stream.remote(sid)) == 3
    assert ray.get(store.delete_stream.remote(sid)) == 0
    assert ray.get(store.count.remote(sid)) == 0 and ray.get(store.nbytes.remote(sid)) == 0
    assert ray.get(store.count.remote()) == total - 3
    assert sid not in ray.get(store.streams.remote())
    with pytest.raises(UnknownStreamError):
        ray.get(store.get.remote(sid))
    assert ray.get(store.delete_stream.remote(other)) == 1


def test_unknown_stream_and_bad_input_raise_typed_errors(store):
    with pytest.raises(UnknownStreamError, match="no-such-stream"):
        ray.get(store.get.remote("no-such-stream"))
    with pytest.raises(InvalidInputError):
        ray.get(store.put.remote([{"not": "a page"}]))
    assert ray.get(store.count.remote("no-such-stream")) == 0


def test_large_pages_round_trip_exactly(store):
    sid = "cam-large"
    big = [make_page(sid, u, layers=(0, 4), heads=8, tokens=1024, head_dim=64) for u in range(2)]
    assert big[0].nbytes == 2 * 4 * 8 * 1024 * 64 * 2  # 8 MiB: keys + values, bf16
    assert ray.get(store.put.remote(big)) == 2
    got = ray.get(store.get.remote(sid))
    assert len(got) == 2
    for want, page in zip(big, got):
        assert not page.keys.flags.writeable  # zero-copy from the object store
        page.verify()
        for a, b in zip(want.to_tensors(), page.to_tensors()):
            assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b)
    assert ray.get(store.nbytes.remote(sid)) == 2 * big[0].nbytes
    assert ray.get(store.delete_stream.remote(sid)) == 2


def _producer_class():
    # Defined in a function so Ray ships it by value (the worker need not import this test module).
    class Producer:
        def make_and_put(self, store, stream_id: str, units: list[int]) -> list[str]:
            import torch as _torch

            from cache_store.pages import KVPage as _KVPage

            pages = []
            for u in units:
                keys = _torch.randn(2, 4, 256, 64).to(_torch.bfloat16)  # 256 KiB: goes through the object store
                values = _torch.randn(2, 4, 256, 64).to(_torch.bfloat16)
                pages.append(_KVPage.from_tensors(keys, values, model_id="tiny-test", stream_id=stream_id, unit_id=u,
                                                  frame_range=(u, u + 1), time_range=(u, u + 1.0),
                                                  positions=(256 * u, 256)))
            ref = ray.put(pages)  # owned by this worker, which is about to be killed
            ray.get(store.put.remote(ref))
            return [p.header.content_hash for p in pages]

        def alive(self) -> bool:
            return True

    return Producer


def test_pages_outlive_the_actor_that_produced_them(store):
    producer = ray.remote(num_cpus=0.05)(_producer_class()).remote()
    hashes = ray.get(producer.make_and_put.remote(store, "cam-owned", [0, 1, 2]))
    ray.kill(producer)
    deadline = time.monotonic() + 120
    with pytest.raises(ray.exceptions.RayActorError):  # it is really gone (the kill is asynchronous)
        while ray.get(producer.alive.remote()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    got = ray.get(store.get.remote("cam-owned"))
    assert [p.header.content_hash for p in got] == hashes
    for page in got:
        page.verify()  # content intact, not just headers
    assert ray.get(store.delete_stream.remote("cam-owned")) == 3


def test_plain_class_in_process_without_spill_is_read_only():
    store = PageStore()
    page = make_page("local", 0)
    assert store.put([page, page]) == 1
    (got,) = store.get("local")
    assert same(got, page) and not got.keys.flags.writeable and got.keys is not page.keys


def test_spill_survives_a_restart(store, spill_dir):
    # Keep this test last in the module: it restarts the shared store.
    sid = "cam-spill/ünïcode id"
    pages = [make_page(sid, u, kind, tokens=64) for u in range(4) for kind in ("frame", "summary")]
    assert ray.get(store.put.remote(pages)) == 8
    assert ray.get(store.drop.remote(sid, [3])) == 2  # a dropped page must not come back
    (spill_dir / "garbage").mkdir()
    (spill_dir / "garbage" / "0.frame.0-2.kvp").write_bytes(b"not a page")
    assert len(list(spill_dir.glob("*/*.kvp"))) == 7  # earlier tests deleted their streams

    old_pid = ray.get(store.stats.remote())["pid"]
    ray.kill(store, no_restart=False)  # the constructor runs again, with its memory empty
    deadline = time.monotonic() + 120
    while (stats := ray.get(store.stats.remote()))["pid"] == old_pid:  # the kill is asynchronous
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert stats["spill_loaded"] == 6 and stats["spill_skipped"] == 1
    assert ray.get(store.streams.remote()) == [sid]
    got = ray.get(store.get.remote(sid))
    want = sorted(pages[:6], key=lambda p: (p.header.unit_id, p.header.kind))
    assert len(got) == 6 and all(same(a, b) for a, b in zip(got, want))
    assert ray.get(store.delete_stream.remote(sid)) == 6
    assert list(spill_dir.glob("*/*.kvp")) == [spill_dir / "garbage" / "0.frame.0-2.kvp"]
