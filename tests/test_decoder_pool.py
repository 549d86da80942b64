"""Decoders host many sources per process (issue 23 item 1), with real Ray, PyAV and the tiny
model: 12 pushed streams on a pool of hosts for 6 sources each run in exactly 2 decoder
processes and every frame is ingested; a finished source holds no thread or buffers on its host;
hosts left without sources go away; a host that dies takes no accepted frame with it: its
uploads are attached again on a new host and go on, its file source says it was lost."""

import time

import pytest
import ray
from ray.exceptions import RayActorError

from tests.stages import scene_video
from tests.test_http_api import mpegts

from actors.coordinator import StreamCoordinator
from actors.decoder_host import UnknownSourceError
from actors.messages import PushReceipt
from actors.release import FEW_ARENAS
from pipeline.video_io import write_video

OPTIONS = {"top_k": 4, "n_local": 24}
CAPACITY = 6  # sources per host: 12 streams need 2 hosts
IDLE_S = 2.0


@pytest.fixture(scope="module")
def coordinator(ray_runtime, checkpoint_dirs):
    handle = ray.remote(StreamCoordinator).options(num_cpus=0.1).remote(
        checkpoint_dirs["gqa"], decoder_capacity=CAPACITY, decoder_idle_s=IDLE_S)
    yield handle
    ray.get(handle.shutdown.remote())
    ray.kill(handle)


def until(condition, timeout_s: float = 90.0, what: str = ""):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.2)
    return value


def host_pid(host) -> int:
    return ray.get(host.__ray_call__.remote(lambda self: __import__("os").getpid()))


def decode_threads(host) -> list[str]:
    """Names of the decode threads alive in the host's process (StreamDecoder's "decode-<id>")."""
    return ray.get(host.__ray_call__.remote(
        lambda self: [t.name for t in __import__("threading").enumerate() if t.name.startswith("decode-")]))


def test_many_pushed_streams_share_two_processes_and_ingest_every_frame(coordinator):
    ids = [f"cam{i}" for i in range(12)]
    for sid in ids:
        ray.get(coordinator.create_stream.remote(sid, "rekv", OPTIONS))
    ray.get([coordinator.attach_source.remote(sid, None) for sid in ids])  # push mode: all running
    workers = ray.get(coordinator.workers.remote())
    hosts = workers["decoder_hosts"]
    assert len(hosts) == 2 and len({host_pid(h) for h in hosts}) == 2  # 2 processes, not 12
    assert sorted(ray.get(h.load.remote()) for h in hosts) == [CAPACITY, CAPACITY]
    assert len(decode_threads(hosts[0])) + len(decode_threads(hosts[1])) == 12
    # few malloc arenas, the job's environment kept (Ray merges the host's env_vars into it)
    environ = ray.get(hosts[0].__ray_call__.remote(lambda self: dict(__import__("os").environ)))
    assert environ.get("MALLOC_ARENA_MAX") == FEW_ARENAS["MALLOC_ARENA_MAX"] and "PYTHONPATH" in environ
    clips = {sid: mpegts(scene_video(4 + i % 3, seed=i)) for i, sid in enumerate(ids)}
    receipts = ray.get([coordinator.push.remote(sid, clips[sid], 0) for sid in ids])
    # one call per chunk answers what the HTTP route reports (no status round trip per chunk)
    assert all(isinstance(r, PushReceipt) and r.buffered_bytes >= 0 and not r.state.terminal for r in receipts)
    finals = ray.get([coordinator.close_source.remote(sid, 120) for sid in ids])
    assert [f["state"] for f in finals] == ["finished"] * 12
    for i, sid in enumerate(ids):
        status = ray.get(coordinator.status.remote(sid))
        assert (status["source_state"], status["frames_ingested"]) == ("finished", 4 + i % 3), status

    # a finished source holds nothing on its host: no decode thread, no buffers, only its status
    for host in hosts:
        held = ray.get(host.held.remote())
        assert len(held) == CAPACITY and not any(h["running"] for h in held.values()), held
        assert ray.get(host.load.remote()) == 0 and decode_threads(host) == []
    source = workers["decoders"]["cam0"]
    assert ray.get(source.status.remote())["frames_delivered"] == 4  # its final status is kept
    with pytest.raises(Exception, match="has ended"):
        ray.get(source.push.remote(b"more", 1))

    # deleting the streams lets their sources go; hosts left without any are removed after IDLE_S
    for sid in ids:
        ray.get(coordinator.delete_stream.remote(sid))
    with pytest.raises(UnknownSourceError):
        ray.get(source.status.remote())
    until(lambda: ray.get(coordinator.workers.remote())["decoder_hosts"] == [], what="idle hosts go away")
    for host in hosts:
        with pytest.raises(RayActorError):
            ray.get(host.load.remote(), timeout=30)


def test_a_dead_host_s_uploads_are_attached_again_and_go_on(coordinator, tmp_path):
    first, second = scene_video(6, seed=1), scene_video(5, seed=2)
    for sid in ("up0", "up1"):
        ray.get(coordinator.create_stream.remote(sid, "rekv", OPTIONS))
        ray.get(coordinator.attach_source.remote(sid, None, None, "block", 1))  # a chunk per frame
        ray.get(coordinator.push.remote(sid, mpegts(first), 0))
    write_video(tmp_path / "file.mp4", first, fps=2.0)
    ray.get(coordinator.create_stream.remote("file", "rekv", OPTIONS))
    ray.get(coordinator.attach_source.remote("file", str(tmp_path / "file.mp4")))
    workers = ray.get(coordinator.workers.remote())
    assert len(workers["decoder_hosts"]) == 1  # all three on one host
    # what the host decoded of the first upload is ingested (the decoder may hold its last frames back)
    before = {}
    for sid in ("up0", "up1"):
        until(lambda: ray.get(coordinator.status.remote(sid))["frames_ingested"] >= 3, what="frames arrive")
        time.sleep(1.0)
        before[sid] = ray.get(coordinator.status.remote(sid))["frames_ingested"]

    ray.kill(workers["decoder_hosts"][0], no_restart=True)
    until(lambda: ray.get(coordinator.status.remote("file"))["mode"] is None, what="the death is noticed")
    for sid in ("up0", "up1"):  # the client goes on: its next chunks reach a decoder on a new host
        ray.get(coordinator.push.remote(sid, mpegts(second), 1))
        ray.get(coordinator.close_source.remote(sid, 120))
        status = ray.get(coordinator.status.remote(sid))
        assert status["mode"] == "push" and status["source_state"] == "finished", status
        assert "attached again" in status["last_error"]
        # nothing ingested before is lost, and every frame of the chunk after the death arrives
        assert status["frames_ingested"] == before[sid] + len(second), (before, status)
    file = ray.get(coordinator.status.remote("file"))
    assert file["source_state"] is None and "file source" in file["last_error"], file
    hosts = ray.get(coordinator.workers.remote())["decoder_hosts"]
    assert len(hosts) == 1 and hosts[0]._actor_id != workers["decoder_hosts"][0]._actor_id
    assert ray.get(coordinator.workers.remote())["decoder_pool"]["hosts_lost"] == 1
    for sid in ("up0", "up1", "file"):
        ray.get(coordinator.delete_stream.remote(sid))
