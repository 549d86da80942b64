"""A named coordinator whose process dies is restarted by Ray and takes its streams over from its
model actors and decoders, which outlive it: memory, frame count, open segment and summary index
are kept, segments closed but not committed are committed, and chunks in flight are sent again
and ingested once, so answers still equal the single-process engine's; `stop_coordinator`
removes everything."""

import time
import uuid

import numpy as np
import pytest
import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from tests.stages import scene_video as video

from actors.coordinator import NAMESPACE
from cache_store.envelope import features_wire
from deploy.ingest import named_coordinator, stop_coordinator
from pipeline import StreamSession, load_model
from pipeline.config import make_config
from pipeline.decode import DecodeConfig, open_source
from pipeline.frames import check_times
from pipeline.video_io import write_video

CASES = {"rekv": {"top_k": 4, "n_local": 24}, "streamkv": {"keep_ratio": 0.4, "top_k": 4, "min_frames": 3, "n_local": 24}}
QUESTIONS = ["what color was the star?", "which shape was red?"]


def answered(answer: dict) -> tuple:
    return answer["token_ids"], [e["frames"] for e in answer["evidence"]]


def until_restarted(handle, stream_id: str, timeout_s: float = 120.0) -> dict:
    """The stream's status from the new process (ray.kill returns before the old one is gone)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            status = ray.get(handle.status.remote(stream_id))
            if status["adopted"]:
                return status
        except (ActorUnavailableError, RayActorError):
            pass
        assert time.monotonic() < deadline, "the coordinator did not come back"
        time.sleep(0.5)


def until_source_ends(handle, stream_id: str, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while (status := ray.get(handle.status.remote(stream_id)))["source_state"] not in ("finished", "failed"):
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    return status


def named_actors(name: str) -> list[str]:
    """The actors named after the coordinator `name` (model actors, decoders)."""
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == NAMESPACE and a["name"].startswith(f"{name}."))


def until(condition, timeout_s: float = 60.0, what: str = ""):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return value


def alive(actor) -> bool:
    try:
        ray.get(actor.__ray_ready__.remote())
        return True
    except (ActorUnavailableError, RayActorError):
        return False


def push_without_commit(handle, stream_id: str, frames) -> int:
    """What a coordinator process does with a chunk before it dies: its frames reach the segmenter
    (closing segments), but it dies before committing those segments."""
    workers, status = ray.get(handle.workers.remote()), ray.get(handle.status.remote(stream_id))
    tokens = ray.get(workers["prefill"].encode_frames.remote([frames]))[0]
    first = status["frames_ingested"]
    times = check_times(None, len(frames), first, status["last_time"],
                        make_config(stream_id, **CASES[stream_id]).frame_rate)
    ranges = [(first + i, first + i + 1) for i in range(len(frames))]
    return len(ray.get(workers["compressor"].push.remote(stream_id, features_wire(tokens, ranges, [(t, t) for t in times]))))


def test_a_restarted_coordinator_takes_its_streams_over(ray_runtime, checkpoint_dirs, redis_server, tmp_path):
    name = f"restart-{uuid.uuid4().hex[:8]}"
    handle = named_coordinator(name, checkpoint_dirs["gqa"], answerers=2, index_url=redis_server.url)
    frames = video(38, seed=21)
    try:
        for method, options in CASES.items():
            ray.get(handle.create_stream.remote(method, method, options))
            ray.get(handle.ingest.remote(method, frames[:9]))
            ray.get(handle.ask.remote(method, QUESTIONS[0], 5))
            # no question after these: their last segment stays open in the compressor, and the
            # updates they committed may still be on their way to the replicas and the index
            ray.get(handle.ingest.remote(method, frames[9:22]))
            closed = push_without_commit(handle, method, frames[22:26])
            assert closed or method != "rekv"  # rekv's 8-frame segment 16..23 closes
        # a live source (policy "drop"; a file stands in for a camera, read again after the restart)
        write_video(tmp_path / "live.mp4", frames[:8], fps=2.0)
        ray.get(handle.create_stream.remote("live", "rekv", CASES["rekv"]))
        ray.get(handle.attach_source.remote("live", str(tmp_path / "live.mp4"), None, "drop", 4, 8))
        assert until_source_ends(handle, "live")["frames_ingested"] == 8
        # its decoder host dies: the coordinator attaches the live source again on a new host
        gone = ray.get(handle.workers.remote())["decoders"]["live"].host
        ray.kill(gone, no_restart=True)
        until(lambda: not alive(gone), what="the live source's host dies")
        live = until(lambda: (s := ray.get(handle.status.remote("live")))["frames_ingested"] == 16
                     and s["source_state"] == "finished" and s, what="the live source goes on on another host")
        assert live["mode"] == "pull" and "attached again" in live["last_error"]
        # a file being read, with every chunk in flight at the kill: the vision tower is kept busy
        write_video(tmp_path / "file.mp4", frames, fps=2.0)
        ray.get(handle.create_stream.remote("file", "rekv", CASES["rekv"]))
        workers = ray.get(handle.workers.remote())
        busy = workers["prefill"].encode_frames.remote([np.concatenate([frames] * 400)])  # ~3 s
        ray.get(handle.attach_source.remote("file", str(tmp_path / "file.mp4"), None, "block", 4, 4))
        decoder = ray.get(handle.workers.remote())["decoders"]["file"]
        until(lambda: ray.get(decoder.status.remote())["chunks_in_flight"] == 4, what="the decoder's window fills")
        ray.kill(handle, no_restart=False)  # the process dies; Ray starts a new one

        until_restarted(handle, "rekv")
        assert sorted(ray.get(handle.list_streams.remote())) == sorted([*CASES, "live", "file"])
        assert [a for a in named_actors(name) if ".decoder." not in a] == [
            f"{name}.{kind}" for kind in ("answerer0", "answerer1", "compressor", "prefill")]
        # the new process replays the open segments from its own copy if the compressor restarts
        ray.kill(ray.get(handle.workers.remote())["compressor"], no_restart=False)
        model = load_model(checkpoint_dirs["gqa"])
        for method, options in CASES.items():
            status = ray.get(handle.status.remote(method))
            assert status["frames_ingested"] == 26 and status["adopted"] and status["restarts"]["coordinator"] == 1
            ray.get(handle.ingest.remote(method, frames[26:30]))
            session = StreamSession(model, method=method, **options)
            session.add_frames(frames[:9])
            session.ask(QUESTIONS[0], max_new_tokens=5)
            session.add_frames(frames[9:30])
            expected = session.ask(QUESTIONS[1], max_new_tokens=5)
            for _ in range(2):  # both answer actors (least busy, then least recently used)
                answer = ray.get(handle.ask.remote(method, QUESTIONS[1], 5))
                assert answered(answer) == (expected.token_ids, [list(e.frames) for e in expected.evidence])
            status = ray.get(handle.status.remote(method))
            assert status["frames_ingested"] == 30 and status["restarts"]["compressor"] >= 1
            assert len(ray.get(handle.segments.remote(method))) == status["segments"]  # every segment indexed
            compressor = ray.get(handle.workers.remote())["compressor"]
            assert ray.get(compressor.held.remote())[method].closed == []  # let go of once recorded

        # the file's decoder outlived the old process: every frame arrived, once
        ray.get(busy)
        status = until_source_ends(handle, "file")
        assert (status["source_state"], status["frames_ingested"], status["frames_pending"]) == ("finished", 38, 0)
        assert ray.get(decoder.status.remote())["resyncs"] == 1
        decoded = list(open_source(tmp_path / "file.mp4", DecodeConfig()))
        session = StreamSession(model, method="rekv", **CASES["rekv"])
        session.add_frames(np.stack([f.image for f in decoded]), timestamps=[f.time for f in decoded])
        expected = session.ask(QUESTIONS[0], max_new_tokens=5)
        answer = ray.get(handle.ask.remote("file", QUESTIONS[0], 5))
        assert answered(answer) == (expected.token_ids, [list(e.frames) for e in expected.evidence])
        # a chunk sent again whose frames the stream has is skipped, not refused
        again = np.stack([f.image for f in decoded[:4]]), np.array([f.time for f in decoded[:4]])
        assert ray.get(handle.ingest.remote("file", *again, seq=0)) == 38

        # the live source attached again before the restart was taken over with its host
        live = until_source_ends(handle, "live")
        assert live["source_state"] == "finished" and live["mode"] == "pull" and live["frames_ingested"] == 16, str(live)
        # a stream without a source takes one after the restart: it continues the stream's frame times
        before = ray.get(handle.status.remote("rekv"))
        assert before["mode"] is None and before["last_error"] is None
        write_video(tmp_path / "more.mp4", frames[30:], fps=2.0)
        ray.get(handle.attach_source.remote("rekv", str(tmp_path / "more.mp4")))
        status = until_source_ends(handle, "rekv")
        assert status["source_state"] == "finished" and status["frames_ingested"] == 38
        gap = 1 / make_config("rekv", **CASES["rekv"]).frame_rate  # between the last frame before and the first after
        assert status["last_time"] == pytest.approx(before["last_time"] + gap + 7 / 2)  # 8 frames at 2 fps
        answer = ray.get(handle.ask.remote("rekv", QUESTIONS[0], 5))
        assert max(e["frames"][1] for e in answer["evidence"]) <= 38
    finally:
        assert stop_coordinator(name) == len(CASES) + 2
    until(lambda: named_actors(name) == [], what="stop_coordinator's kills take effect")  # ray.kill is asynchronous
