"""Frame thumbnails (cache_store/thumbnails.py) on both backends (Redis: the real private
redis-server), and the coordinator's thumbnailer (actors/thumbnailer.py) on a real event loop."""

import asyncio
import io
import time

import numpy as np
import pytest
from PIL import Image

from actors.thumbnailer import ThumbnailKeeper
from cache_store import RedisIndex, SegmentRecord
from cache_store.thumbnails import EmbeddedThumbnails, RedisThumbnails, encode_jpeg, open_thumbnails, thinned
from pipeline.errors import ConfigError, InvalidInputError


@pytest.fixture(params=["embedded", "redis"])
def store(request):
    if request.param == "embedded":
        return EmbeddedThumbnails(capacity=8)
    return RedisThumbnails(request.getfixturevalue("redis_client"), capacity=8)


def jpeg_of(frame: int) -> bytes:
    return f"jpeg {frame}".encode()  # the store keeps bytes as given


def feed(store, frames: int, chunk: int = 5, stream: str = "cam") -> None:
    """Frames 0..frames-1 in chunks, each chunk only with the frames the store wants (as the thumbnailer does)."""
    for first in range(0, frames, chunk):
        wanted = store.wanted(stream, first, min(chunk, frames - first))
        store.add(stream, {f: jpeg_of(f) for f in wanted})


def test_encode_jpeg_is_a_small_picture_of_the_frame():
    frame = np.zeros((270, 480, 3), np.uint8)
    frame[:, :240] = (255, 0, 0)  # left half red, right half black
    image = Image.open(io.BytesIO(encode_jpeg(frame)))
    assert image.format == "JPEG" and max(image.size) == 160 and image.size[0] / image.size[1] == pytest.approx(16 / 9, 0.05)
    left, right = image.getpixel((20, 45)), image.getpixel((140, 45))
    assert left[0] > 200 and left[1] < 60 and max(right) < 40
    small = Image.open(io.BytesIO(encode_jpeg(np.full((32, 32, 3), 128, np.uint8))))
    assert small.size == (32, 32)  # never enlarged
    with pytest.raises(InvalidInputError):
        encode_jpeg(np.zeros((32, 32), np.uint8))


def test_stride_doubles_to_keep_the_capacity():
    assert thinned(1, 7, 8) == 1 and thinned(1, 8, 8) == 2 and thinned(2, 100, 8) == 16
    assert thinned(4, 3, 8) == 4  # never shrinks


@pytest.mark.parametrize("frames", [1, 8, 9, 37, 200])
def test_bounded_and_even_over_the_whole_stream(store, frames):
    feed(store, frames)
    kept = store.frames("cam")
    stride = store.stride("cam")
    assert len(kept) <= 8 and kept == list(range(0, frames, stride))
    assert frames <= 8 * stride  # the whole stream is covered: none older was forgotten
    # every frame has a thumbnail within stride / 2 frames, the nearest kept one (earlier on a tie)
    asked = list(range(frames))
    found = store.nearest("cam", asked)
    for frame, thumb in zip(asked, found):
        assert abs(thumb.frame - frame) <= stride // 2 and thumb.jpeg == jpeg_of(thumb.frame)
        assert thumb.frame == min(kept, key=lambda k: (abs(k - frame), k))
    assert store.nearest("cam", [10**9])[0].frame == kept[-1]


def test_streams_apart_and_freed_with_the_stream(store):
    feed(store, 20, stream="a")
    feed(store, 3, stream="b")
    assert store.nearest("nope", [0]) == [None] and store.frames("nope") == []
    assert store.delete_stream("a") == len(range(0, 20, 4))
    assert store.frames("a") == [] and store.nearest("a", [3]) == [None] and store.stride("a") == 1
    assert store.frames("b") == [0, 1, 2] and store.delete_stream("a") == 0
    with pytest.raises(InvalidInputError):
        store.add("bad{id}", {0: b"x"})


def test_redis_keys_are_the_streams_own_and_leave_the_index_alone(redis_client):
    index, store = RedisIndex(redis_client), RedisThumbnails(redis_client, capacity=8)
    index.put(SegmentRecord("cam", 0, (0, 4), (0.0, 1.0), [0], np.ones((2, 4), np.float32)))
    feed(store, 30)
    assert index.count_keys("cam") == 2  # its record and ids: thumbnails are not counted as index keys
    assert len(list(redis_client.scan_iter("streamkv:thumbs:{cam}:*"))) == len(store.frames("cam")) + 2
    assert store.delete_stream("cam") == 8
    assert list(redis_client.scan_iter("streamkv:thumbs:*")) == [] and index.count_keys("cam") == 2
    with pytest.raises(ConfigError):
        RedisThumbnails("redis://127.0.0.1:1/0?decode_responses=True")
    assert isinstance(open_thumbnails(None), EmbeddedThumbnails)


def test_thumbnailer_keeps_order_and_frees_after_its_work():
    async def run():
        store = EmbeddedThumbnails(capacity=64)
        keeper = ThumbnailKeeper(store, spawn=asyncio.ensure_future, max_pending=100)
        video = np.zeros((40, 24, 32, 3), np.uint8)
        video[:, :, :, 1] = np.arange(40)[:, None, None] * 6  # each frame its own green level
        for first in range(0, 40, 8):
            keeper.keep("cam", first, video[first:first + 8])
        assert await keeper.drop("other") == 0
        await asyncio.wait([keeper.tails["cam"]])
        found = await keeper.nearest("cam", [0, 17, 39])
        assert [t.frame for t in found] == [0, 17, 39]
        green = Image.open(io.BytesIO(found[1].jpeg)).getpixel((16, 12))[1]
        assert abs(green - 17 * 6) <= 6  # frame 17's picture
        keeper.keep("cam", 40, video[:8])  # still in flight when the stream is dropped
        assert await keeper.drop("cam") == 48 and store.frames("cam") == []

    asyncio.run(run())


def test_thumbnailer_skips_a_chunk_when_behind_and_survives_a_failing_store():
    class Failing(EmbeddedThumbnails):
        def add(self, stream_id, jpegs):
            raise OSError("store down")

    async def run():
        keeper = ThumbnailKeeper(Failing(), spawn=asyncio.ensure_future, max_pending=1)
        frames = np.zeros((4, 8, 8, 3), np.uint8)
        keeper.keep("cam", 0, frames)
        first = keeper.tails["cam"]
        keeper.keep("cam", 4, frames)  # one pending already: skipped
        assert keeper.tails["cam"] is first
        await asyncio.wait([first])
        assert first.exception() is None and keeper.pending["cam"] == 0

    asyncio.run(run())


def test_the_coordinator_keeps_each_streams_thumbnails_in_redis_and_frees_them_with_it(
        ray_runtime, checkpoint_dirs, redis_server):
    """A real coordinator on Ray with its index in the real redis-server: ingested frames get
    thumbnails (the frames' pictures), kept in Redis beside the index, and gone with the stream."""
    import ray

    from actors.coordinator import StreamCoordinator
    from tests.stages import scene_video

    redis = redis_server.client()
    coordinator = ray.remote(StreamCoordinator).options(num_cpus=0.05).remote(
        checkpoint_dirs["gqa"], index_url=redis_server.url)
    try:
        frames = scene_video(20, seed=3)
        ray.get(coordinator.create_stream.remote("thumbs", "rekv", {"n_local": 24}))
        ray.get(coordinator.ingest.remote("thumbs", frames[:12]))
        ray.get(coordinator.ingest.remote("thumbs", frames[12:]))
        found = []
        for _ in range(200):  # written just after each chunk is ingested (up to ~10 s)
            found = ray.get(coordinator.thumbnails.remote("thumbs", list(range(20))))
            if all(t is not None and t.frame == i for i, t in enumerate(found)):
                break
            time.sleep(0.05)
        assert [t.frame for t in found] == list(range(20))
        for frame, thumb in zip(frames, found):  # each the picture of its frame (a few JPEG levels off)
            picture = np.asarray(Image.open(io.BytesIO(thumb.jpeg)).convert("RGB"), np.int16)
            assert picture.shape == frame.shape and np.abs(picture.mean((0, 1)) - frame.mean((0, 1))).max() < 8
        assert len(list(redis.scan_iter("streamkv:thumbs:{thumbs}:f:*"))) == 20
        with pytest.raises(Exception, match="UnknownStreamError|unknown stream"):
            ray.get(coordinator.thumbnails.remote("nope", [0]))
        ray.get(coordinator.delete_stream.remote("thumbs"))
        assert list(redis.scan_iter("streamkv:thumbs:*")) == []
    finally:
        ray.kill(coordinator)
