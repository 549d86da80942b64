"""The Ray pipeline with its segment index on a real redis-server that is unreachable from the
start, then killed mid-ingest and restarted with its AOF or empty: no ingest call fails, answers
equal the engine's, status says how the index stands, and once Redis is back it holds every
segment's record of every stream, those it lost included. The tests share one coordinator and
one server, in file order."""

import shutil
import time

import pytest
import ray

from tests.plugins.redis_server import RedisServer, free_port
from tests.stages import scene_video as video
from tests.test_ray_pipeline import CASES, QUESTIONS, engine_answers

from actors.coordinator import StreamCoordinator
from cache_store.index import RedisIndex
from pipeline import load_model

CHUNK = 6


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server binary not found on PATH (apt-get install redis-server)")
    server = RedisServer(binary, tmp_path_factory.mktemp("faulty-redis"), "aof")
    server.port = free_port()  # not started: unreachable from the start
    yield server
    server.stop()


@pytest.fixture(scope="module")
def coordinator(ray_runtime, checkpoint_dirs, server):
    handle = ray.remote(StreamCoordinator).options(num_cpus=0.1).remote(checkpoint_dirs["gqa"], index_url=server.url)
    yield handle
    ray.kill(handle)


@pytest.fixture(scope="module")
def engine_model(checkpoint_dirs):
    return load_model(checkpoint_dirs["gqa"])


def ask(coordinator, stream_id):
    answer = ray.get(coordinator.ask.remote(stream_id, QUESTIONS[0], 5))
    return answer["token_ids"], [e["frames"] for e in answer["evidence"]]


def caught_up(coordinator, timeout_s: float = 120.0) -> dict:
    """Wait (bounded; not a timing assertion) until the index is healthy with nothing pending."""
    deadline = time.monotonic() + timeout_s
    while True:
        health = ray.get(coordinator.index_health.remote())
        if health["state"] == "healthy" and not health["pending_writes"] and not health["pending_deletes"]:
            return health
        assert time.monotonic() < deadline, health
        time.sleep(0.1)


def assert_index_whole(coordinator, server, streams: list[str]) -> None:
    """Redis holds a record of every committed segment of every stream (each segment of these
    methods has blocks, so each has a record), equal to what the coordinator lists."""
    index = RedisIndex(server.url)
    assert index.streams() == sorted(streams)
    for sid in streams:
        committed = ray.get(coordinator.status.remote(sid))["segments"]
        stored = index.segments(sid)
        assert [r.segment_id for r in stored] == list(range(committed)) and committed > 0
        listed = ray.get(coordinator.segments.remote(sid))
        assert [(s["segment"], s["frames"], s["units"]) for s in listed] == \
            [(r.segment_id, list(r.frame_range), r.unit_ids) for r in stored]


def test_unreachable_from_the_start(coordinator, server, engine_model):
    frames, sid = video(18, seed=21), "from-start"
    ray.get(coordinator.create_stream.remote(sid, "rekv", CASES["rekv"]))
    answers = []
    for start in range(0, len(frames), CHUNK):
        assert ray.get(coordinator.ingest.remote(sid, frames[start : start + CHUNK])) == start + CHUNK
        answers.append(ray.get(coordinator.ask.remote(sid, QUESTIONS[len(answers) % 2], 5)))
    got = [(a["token_ids"], [e["frames"] for e in a["evidence"]]) for a in answers]
    assert got == engine_answers(engine_model, "rekv", frames, [CHUNK] * 3)
    status = ray.get(coordinator.status.remote(sid))
    index = status["index"]
    assert index["state"] == "degraded" and index["pending_writes"] == status["segments"] > 0
    assert "ConnectionError" in index["last_error"]
    listed = ray.get(coordinator.segments.remote(sid))  # from the compressor's journal meanwhile
    assert [s["segment"] for s in listed] == list(range(status["segments"]))
    server.start(server.port)
    health = caught_up(coordinator)
    assert health["records_rewritten"] == status["segments"] and health["last_catch_up_s"] > 0
    assert_index_whole(coordinator, server, [sid])
    assert ray.get(coordinator.status.remote(sid))["index"]["state"] == "healthy"


@pytest.mark.parametrize("persistence", ["aof", "none"])
def test_killed_mid_ingest_and_restarted(coordinator, server, engine_model, persistence):
    """SIGKILL while chunks are in flight; the server comes back with its AOF, or empty (then
    every stream's records, those of the earlier test too, are written again)."""
    frames, sid, method = video(24, seed=31), f"killed-{persistence}", "streamkv"
    expected = engine_answers(engine_model, method, frames, [CHUNK, len(frames) - CHUNK])
    ray.get(coordinator.create_stream.remote(sid, method, CASES[method]))
    ray.get(coordinator.ingest.remote(sid, frames[:CHUNK]))
    first = ask(coordinator, sid)
    resets = ray.get(coordinator.index_health.remote())["resets"]
    in_flight = [coordinator.ingest.remote(sid, frames[s : s + CHUNK], None, i)
                 for i, s in enumerate(range(CHUNK, len(frames), CHUNK))]
    server.kill()
    assert ray.get(in_flight)[-1] == len(frames)  # no ingest call failed
    assert [first, ask(coordinator, sid)] == expected
    index = ray.get(coordinator.status.remote(sid))["index"]
    assert index["state"] == "degraded" and index["pending_writes"] > 0
    server.persistence = persistence
    server.start(server.port)
    health = caught_up(coordinator)
    assert health["resets"] == resets + (persistence == "none")
    assert health["records_dropped"] == health["records_unrecoverable"] == 0
    streams = ["from-start", "killed-aof"] + (["killed-none"] if persistence == "none" else [])
    assert_index_whole(coordinator, server, streams)
    assert ask(coordinator, sid) == expected[-1]  # (no frames came since)


def test_delete_while_unreachable(coordinator, server, tmp_path):
    """A stream deleted while Redis is down is gone from it once it is back (with its AOF)."""
    sid = "deleted-while-down"
    ray.get(coordinator.create_stream.remote(sid, "rekv", CASES["rekv"]))
    ray.get(coordinator.ingest.remote(sid, video(12, seed=41)))
    ask(coordinator, sid)  # (waits until its updates reached the index writer)
    caught_up(coordinator)
    assert sid in RedisIndex(server.url).streams()
    server.stop()  # back with an AOF of its own (the one of the first tests is stale by now): empty
    server.persistence, server.dir = "aof", tmp_path
    server.start(server.port)
    caught_up(coordinator)
    ray.get(coordinator.ingest.remote(sid, video(6, seed=42)))
    ask(coordinator, sid)
    caught_up(coordinator)
    server.stop()  # SIGTERM: its AOF holds the stream
    assert ray.get(coordinator.delete_stream.remote(sid))["index_keys_deleted"] == 0  # queued
    assert ray.get(coordinator.index_health.remote())["pending_deletes"] == 1
    server.start(server.port)
    caught_up(coordinator)
    assert sid not in RedisIndex(server.url).streams()
    # the console's thumbnails of the stream (same Redis) go too: their deletion is tried again,
    # backing off up to 30 s (actors/thumbnailer.py)
    deadline = time.monotonic() + 60
    while left := [k for k in server.client().scan_iter() if sid.encode() in k]:
        assert time.monotonic() < deadline, left
        time.sleep(0.5)
