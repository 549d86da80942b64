"""The Ray pipeline hosts the engine: same answers, isolated streams, recovery from dead actors,
a streamed answer, an answer pool that grows and shrinks."""

import gc
import sys
import time
import weakref

import numpy as np
import pytest
import ray
from hypothesis import given
from hypothesis import strategies as st

from tests.plugins.ray_runtime import SINGLE_SLOT
from tests.stages import scene_video as video

from actors.coordinator import StreamCoordinator
from actors.decoder_host import UnknownSourceError
from deploy.app import stream_status
from pipeline import InvalidInputError, StreamSession, UnknownStreamError, load_model
from pipeline.errors import AnswerResumeError, StreamLostError

QUESTIONS = ["what color was the star?", "which shape was red?"]
LONG_ANSWER = 1024  # tokens
CASES = {
    "rekv": {"top_k": 4, "n_local": 24},
    "streamkv": {"keep_ratio": 0.4, "top_k": 4, "min_frames": 3, "n_local": 24},
    "livevlm": {"budget_tokens": 40, "n_local": 16, "vsb_queries": 4, "page_tokens": 4},
}


def engine_answers(model, method, frames, chunks):
    session = StreamSession(model, method=method, **CASES[method])
    answers, start = [], 0
    for size in chunks:
        session.add_frames(frames[start : start + size])
        start += size
        answers.append(session.ask(QUESTIONS[len(answers) % 2], max_new_tokens=5))
    return [(a.token_ids, [list(e.frames) for e in a.evidence]) for a in answers]


def ray_answers(coordinator, stream_id, method, frames, chunks, between=None, before_ask=None):
    """between: called once, after the first chunk; before_ask: before every question."""
    ray.get(coordinator.create_stream.remote(stream_id, method, CASES[method]))
    answers, start = [], 0
    for i, size in enumerate(chunks):
        ray.get(coordinator.ingest.remote(stream_id, frames[start : start + size]))
        start += size
        if between is not None and i == 0:
            between()
        if before_ask is not None:
            before_ask()
        answer = ray.get(coordinator.ask.remote(stream_id, QUESTIONS[len(answers) % 2], 5))
        answers.append((answer["token_ids"], [e["frames"] for e in answer["evidence"]]))
    return answers


@pytest.fixture(scope="module")
def engine_model(checkpoint_dirs):
    return load_model(checkpoint_dirs["gqa"])


@pytest.fixture(scope="module")
def coordinator(ray_runtime, checkpoint_dirs, redis_server):
    handle = ray.remote(StreamCoordinator).options(num_cpus=0.1).remote(
        checkpoint_dirs["gqa"], answerers=2, index_url=redis_server.url)
    yield handle
    ray.kill(handle)


@pytest.mark.parametrize("method", sorted(CASES))
def test_same_answers_and_evidence_as_the_engine(coordinator, engine_model, method):
    frames, chunks = video(30, seed=1), [9, 13, 8]
    expected = engine_answers(engine_model, method, frames, chunks)
    assert ray_answers(coordinator, f"eq-{method}", method, frames, chunks) == expected


@pytest.mark.parametrize("method", ["rekv", "streamkv"])
def test_the_node_holds_retained_kv_once_however_many_replicas(coordinator, method):
    """The prefill actor's and both answer actors' blocks are views of the same pages in the
    node's object store (issue 19 item 1): none in a process's own memory."""
    sid = f"shared-{method}"
    ray.get(coordinator.create_stream.remote(sid, method, CASES[method]))
    ray.get(coordinator.ingest.remote(sid, video(40, seed=3)))
    retained = ray.get(coordinator.memory.remote(sid))  # (once every replica has every update)
    workers = ray.get(coordinator.workers.remote())
    places = ray.get([w.residence.remote(sid) for w in [workers["prefill"], *workers["answerers"]]])
    ray.get(coordinator.delete_stream.remote(sid))
    assert len(places) == 3 and retained["blocks"] > 0
    for place in places:
        assert place["blocks"]["private"] == 0 and place["blocks"]["shared"] == retained["blocks"], place
    assert len({place["blocks"]["at"] for place in places}) == 1  # the same copy, not three


@pytest.mark.parametrize("method", ["rekv", "streamkv"])
def test_a_burst_of_chunks_is_segmented_together_and_a_bad_one_refused_alone(coordinator, engine_model, method):
    """Chunks that queue up (a decoder far ahead of the pipeline) are segmented and committed in
    fewer calls than chunks; one with bad timestamps in the middle of the burst is refused alone;
    the answer equals the engine's on the frames accepted."""
    frames, size, bad = video(30, seed=11), 3, 4
    stream_id = f"burst-{method}"
    ray.get(coordinator.create_stream.remote(stream_id, method, CASES[method]))
    starts = list(enumerate(range(0, len(frames), size)))
    refs = {seq: coordinator.ingest.remote(stream_id, frames[start : start + size],
                                           [0.0] * size if seq == bad else [(start + i) / 2 for i in range(size)], seq)
            for seq, start in reversed(starts)}  # the first chunk last: the others are all queued by then
    refs = [refs[seq] for seq, _ in starts]
    for seq, ref in enumerate(refs):
        if seq == bad:
            with pytest.raises(InvalidInputError, match="increasing"):
                ray.get(ref)
        else:
            ray.get(ref)
    session = StreamSession(engine_model, method=method, **CASES[method])
    session.add_frames(np.concatenate([frames[: bad * size], frames[(bad + 1) * size :]]))
    expected = session.ask(QUESTIONS[0], max_new_tokens=5)
    answer = ray.get(coordinator.ask.remote(stream_id, QUESTIONS[0], 5))
    assert (answer["token_ids"], [e["frames"] for e in answer["evidence"]]) == \
        (expected.token_ids, [list(e.frames) for e in expected.evidence])
    status = ray.get(coordinator.status.remote(stream_id))
    assert status["frames_ingested"] == len(frames) - size
    assert status["batching"]["chunks"] == len(refs) - 1 and status["batching"]["pushes"] < len(refs) - 1


@pytest.mark.parametrize("recursive", [False, True])
def test_cancelled_questions_leave_the_stream_whole(coordinator, engine_model, recursive):
    """A caller that goes away (an HTTP client disconnecting) cancels its question in the
    coordinator, possibly while the segment it closed is being committed; that commit is shielded
    and the ones after it are chained to it, so later answers still equal the engine's.
    recursive=True (Ray's default) also cancels the question's queued calls to the model actors,
    which the coordinator sends again."""
    frames, chunks = video(30, seed=4), [9, 13, 8]
    expected = engine_answers(engine_model, "streamkv", frames, chunks)
    stream_id = f"cancelled-{recursive}"

    def cancel_questions():
        for delay_s in (0.005, 0.015):  # while its segment is flushed or committed, not before
            ref = coordinator.ask.remote(stream_id, QUESTIONS[0], 5)
            time.sleep(delay_s)
            ray.cancel(ref, recursive=recursive)

    assert ray_answers(coordinator, stream_id, "streamkv", frames, chunks, before_ask=cancel_questions) == expected


def test_eight_concurrent_streams_are_isolated(coordinator, engine_model):
    lengths = {f"cam{i}": 12 + 3 * i for i in range(8)}
    videos = {sid: video(n, seed=100 + i) for i, (sid, n) in enumerate(lengths.items())}
    ray.get([coordinator.create_stream.remote(sid, "rekv", CASES["rekv"]) for sid in lengths])
    for start in range(0, max(lengths.values()), 6):  # every stream ingests at once, chunk by chunk
        ray.get([coordinator.ingest.remote(sid, v[start : start + 6]) for sid, v in videos.items() if start < len(v)])
    answers = ray.get([coordinator.ask.remote(sid, QUESTIONS[0], 5) for sid in lengths])
    for (sid, n), answer in zip(lengths.items(), answers):
        assert all(e["frames"][1] <= n for e in answer["evidence"])
        session = StreamSession(engine_model, method="rekv", **CASES["rekv"])
        session.add_frames(videos[sid])
        expected = session.ask(QUESTIONS[0], max_new_tokens=5)
        assert answer["token_ids"] == expected.token_ids
        assert [e["frames"] for e in answer["evidence"]] == [list(e.frames) for e in expected.evidence]
        assert ray.get(coordinator.status.remote(sid))["frames_ingested"] == n
    # what passed through the coordinator (visual tokens, closed segments, updates by reference,
    # errors) did not make its process import torch
    imported = ray.get(coordinator.__ray_call__.remote(lambda _: {"torch", "transformers"} & set(sys.modules)))
    assert imported == set()


@pytest.mark.parametrize("victims", [("prefill",), ("compressor",), ("answerer",), ("prefill", "answerer")])
def test_a_killed_actor_loses_nothing(coordinator, engine_model, victims):
    """Kill actors mid-stream (with a segment open): one of each kind, and the prefill actor with
    an answer actor at the same moment; later answers still equal the engine's on the whole
    video, so evidence from before the fault is still there."""
    frames, chunks = video(30, seed=7), [10, 11, 9]
    expected = engine_answers(engine_model, "streamkv", frames, chunks)
    workers = ray.get(coordinator.workers.remote())
    stream_id, before = "fault-" + "-".join(victims), {}

    def kill():
        before.update(ray.get(coordinator.status.remote(stream_id))["restarts"])
        for victim in victims:
            ray.kill(workers["answerers"][1] if victim == "answerer" else workers[victim], no_restart=False)

    answers = ray_answers(coordinator, stream_id, "streamkv", frames, chunks, between=kill)
    assert answers == expected
    status = ray.get(coordinator.status.remote(stream_id))
    assert all(status["restarts"][victim] > before[victim] for victim in victims) and status["recoveries"] >= 1
    assert status["frames_ingested"] == 30


def test_redis_restart_keeps_the_index(coordinator, redis_server):
    frames = video(24, seed=3)
    ray.get(coordinator.create_stream.remote("redis", "streamkv", CASES["streamkv"]))
    ray.get(coordinator.ingest.remote("redis", frames[:16]))
    before = ray.get(coordinator.segments.remote("redis"))
    redis_server.restart()
    assert ray.get(coordinator.segments.remote("redis")) == before and before
    ray.get(coordinator.ingest.remote("redis", frames[16:]))
    ray.get(coordinator.ask.remote("redis", QUESTIONS[0], 3))
    assert len(ray.get(coordinator.segments.remote("redis"))) > len(before)


def test_delete_frees_replicas_and_index_keys(coordinator):
    ray.get(coordinator.create_stream.remote("gone", "rekv", CASES["rekv"]))
    ray.get(coordinator.ingest.remote("gone", video(16, seed=5)))
    ray.get(coordinator.ask.remote("gone", QUESTIONS[0], 3))
    assert ray.get(coordinator.index_keys.remote("gone")) > 0
    workers = ray.get(coordinator.workers.remote())
    held = [ray.get(w.ping.remote()) for w in [workers["prefill"], *workers["answerers"]]]
    deleted = ray.get(coordinator.delete_stream.remote("gone"))
    assert deleted["index_keys_deleted"] > 0 and ray.get(coordinator.index_keys.remote("gone")) == 0
    assert [ray.get(w.ping.remote()) for w in [workers["prefill"], *workers["answerers"]]] == [h - 1 for h in held]
    with pytest.raises(UnknownStreamError):
        ray.get(coordinator.ask.remote("gone", QUESTIONS[0], 3))


def _watch_stream(coordinator, stream_id):
    """Turn the coordinator's garbage collector off and keep a weak reference to the stream's state."""
    def watch(self):
        gc.disable()
        self.watched = weakref.ref(self.streams[stream_id])
    ray.get(coordinator.__ray_call__.remote(watch))


def _watched_stream_is_alive(coordinator) -> bool:
    def check(self):
        alive = self.watched() is not None
        gc.enable()
        return alive
    return ray.get(coordinator.__ray_call__.remote(check))


def test_frames_in_flight_when_a_stream_is_deleted_never_reach_a_stream_created_under_its_id(coordinator):
    ray.get(coordinator.create_stream.remote("reused", "rekv", CASES["rekv"]))
    _watch_stream(coordinator, "reused")
    ray.get(coordinator.__ray_call__.remote(lambda self: setattr(self, "vision_before", self._vision.running)))
    late = coordinator.ingest.remote("reused", video(128, seed=3))
    while ray.get(coordinator.__ray_call__.remote(lambda self: self._vision.running is self.vision_before)):
        time.sleep(0.01)  # until its frames go to the vision tower (a new vision call starts)
    ray.get(coordinator.delete_stream.remote("reused"))
    ray.get(coordinator.create_stream.remote("reused", "rekv", CASES["rekv"]))
    with pytest.raises(UnknownStreamError, match="was deleted"):
        ray.get(late)
    assert ray.get(coordinator.status.remote("reused"))["frames_ingested"] == 0
    assert ray.get(coordinator.segments.remote("reused")) == []
    memory = ray.get(coordinator.memory.remote("reused"))
    assert memory["blocks"] == memory["window"] == 0
    # the deleted stream's state was freed at once, with no reference cycle left for the collector
    assert not _watched_stream_is_alive(coordinator)
    ray.get(coordinator.delete_stream.remote("reused"))


def test_of_two_concurrent_creates_of_one_id_exactly_one_succeeds(coordinator):
    creates = [coordinator.create_stream.remote("twice", "rekv", CASES["rekv"]) for _ in range(2)]
    outcomes = []
    for ref in creates:
        try:
            outcomes.append(ray.get(ref)["stream_id"])
        except InvalidInputError as error:
            outcomes.append("already in use" in str(error))
    assert sorted(outcomes, key=str) == sorted(["twice", True], key=str)
    ray.get(coordinator.ingest.remote("twice", video(8, seed=4)))
    assert ray.get(coordinator.status.remote("twice"))["frames_ingested"] == 8
    ray.get(coordinator.delete_stream.remote("twice"))


def test_bad_requests_are_typed_and_leave_the_stream_usable(coordinator):
    ray.get(coordinator.create_stream.remote("bad", "rekv", CASES["rekv"]))
    ray.get(coordinator.ingest.remote("bad", video(8, seed=9)))
    with pytest.raises(InvalidInputError):
        ray.get(coordinator.ingest.remote("bad", np.zeros((2, 8, 8), np.uint8)))
    with pytest.raises(InvalidInputError):
        ray.get(coordinator.ask.remote("bad", "", 3))
    with pytest.raises(UnknownStreamError):
        ray.get(coordinator.ingest.remote("nope", video(2, seed=1)))
    assert ray.get(coordinator.ask.remote("bad", QUESTIONS[0], 3))["token_ids"]
    assert ray.get(coordinator.status.remote("bad"))["frames_ingested"] == 8


def wait_source(coordinator, stream_id, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = ray.get(coordinator.status.remote(stream_id))
        if status["source_state"] in ("finished", "failed", "stopped"):
            return status
        time.sleep(0.2)
    raise AssertionError(f"source of {stream_id} did not finish: {status}")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from pipeline.video_io import write_video

    path = tmp_path_factory.mktemp("clips") / "scenes.mp4"
    write_video(path, video(60, seed=21), fps=2.0)
    return str(path)


def test_a_file_source_with_block_loses_nothing(coordinator, engine_model, clip):
    ray.get(coordinator.create_stream.remote("file-block", "rekv", CASES["rekv"]))
    # 4 chunks in flight: the async coordinator may start them in any order, and takes them in seq order
    ray.get(coordinator.attach_source.remote("file-block", clip, None, "block", 4, 4))
    status = wait_source(coordinator, "file-block")
    assert status["source_state"] == "finished" and status["frames_dropped"] == 0
    assert status["frames_ingested"] == status["frames_decoded"] == 60
    assert ray.get(coordinator.ask.remote("file-block", QUESTIONS[0], 3))["evidence"]
    decoder = ray.get(coordinator.workers.remote())["decoders"]["file-block"]
    assert not ray.get(decoder.host.held.remote())[decoder.key]["running"]  # finished: only its status is kept
    ray.get(coordinator.delete_stream.remote("file-block"))
    with pytest.raises(UnknownSourceError):  # its host let it go with the stream
        ray.get(decoder.status.remote())
    assert decoder.key not in ray.get(decoder.host.held.remote())


def test_a_live_source_that_outruns_the_pipeline_drops_and_counts(coordinator, clip):
    ray.get(coordinator.create_stream.remote("file-drop", "streamkv", CASES["streamkv"]))
    ray.get(coordinator.attach_source.remote("file-drop", clip, None, "drop", 2, 1))
    status = wait_source(coordinator, "file-drop")
    assert status["frames_dropped"] > 0  # decoding (hundreds of fps) outruns streamkv's ingest
    assert status["frames_ingested"] + status["frames_dropped"] == status["frames_decoded"] == 60
    assert ray.get(coordinator.ask.remote("file-drop", QUESTIONS[0], 3))["token_ids"]


def test_a_corrupt_source_fails_that_stream_only(coordinator, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 100)
    ray.get(coordinator.create_stream.remote("corrupt", "rekv", CASES["rekv"]))
    ray.get(coordinator.attach_source.remote("corrupt", str(broken)))
    status = wait_source(coordinator, "corrupt")
    assert status["source_state"] == "failed" and "VideoDecodeError" in str(status["last_error"])
    ray.get(coordinator.ingest.remote("corrupt", video(4, seed=2)))  # the stream itself still works
    assert ray.get(coordinator.status.remote("corrupt"))["frames_ingested"] == 4


def test_a_streamed_answer_is_the_answer(coordinator):
    ray.get(coordinator.create_stream.remote("streamed", "rekv", CASES["rekv"]))
    ray.get(coordinator.ingest.remote("streamed", video(20, seed=11)))
    whole = ray.get(coordinator.ask.remote("streamed", QUESTIONS[0], 6))
    items = [ray.get(ref) for ref in coordinator.ask_stream.options(num_returns="streaming").remote(
        "streamed", QUESTIONS[0], 6)]
    head, pieces, tail = items[0], items[1:-1], items[-1]
    assert head["evidence"] == whole["evidence"] and head["prompt_tokens"] == whole["prompt_tokens"] > 20
    assert "".join(pieces) == whole["text"] and tail["token_ids"] == whole["token_ids"]
    with pytest.raises(InvalidInputError):  # a bad question fails at the first item
        ray.get(next(iter(coordinator.ask_stream.options(num_returns="streaming").remote("streamed", "", 6))))


def long_streamed_answer(coordinator, stream_id):
    """A stream on whose frames the test model never says its end token: ~2 s of answer, so a
    kill after its first item lands midway. Returns the whole answer and the streamed items."""
    ray.get(coordinator.create_stream.remote(stream_id, "rekv", CASES["rekv"]))
    ray.get(coordinator.ingest.remote(stream_id, video(20, seed=13)))
    whole = ray.get(coordinator.ask.remote(stream_id, "describe the video", LONG_ANSWER))
    assert len(whole["token_ids"]) == LONG_ANSWER
    return whole, coordinator.ask_stream.options(num_returns="streaming").remote(
        stream_id, "describe the video", LONG_ANSWER)


def kill_answerers(coordinator):
    for answerer in ray.get(coordinator.workers.remote())["answerers"]:  # whichever is answering
        ray.kill(answerer, no_restart=False)


def test_a_streamed_answer_resumes_where_it_stopped_when_its_answer_actor_is_killed(coordinator):
    whole, items = long_streamed_answer(coordinator, "resumed")
    before = ray.get(coordinator.status.remote("resumed"))["restarts"]["answerer"]
    head = ray.get(next(items))
    kill_answerers(coordinator)
    rest = [ray.get(ref) for ref in items]
    assert head["evidence"] == whole["evidence"]
    assert "".join(rest[:-1]) == whole["text"] and rest[-1]["token_ids"] == whole["token_ids"]
    assert ray.get(coordinator.status.remote("resumed"))["restarts"]["answerer"] > before
    ray.get(coordinator.delete_stream.remote("resumed"))


def test_a_streamed_answer_does_not_resume_on_a_memory_that_changed_since_it_began(coordinator):
    whole, items = long_streamed_answer(coordinator, "moved-on")
    ray.get(next(items))
    ray.get(coordinator.ingest.remote("moved-on", video(20, seed=14)))  # commits updates meanwhile
    kill_answerers(coordinator)
    with pytest.raises(AnswerResumeError):
        for ref in items:
            ray.get(ref)
    assert ray.get(coordinator.ask.remote("moved-on", QUESTIONS[0], 3))["applied"] > whole["applied"]
    ray.get(coordinator.delete_stream.remote("moved-on"))


def test_the_answer_pool_grows_under_load_and_shrinks_when_idle(ray_runtime, checkpoint_dirs, engine_model):
    """One answer actor, at most two, a target of one question in flight: concurrent questions
    start a second actor, which receives every stream and then answers exactly like the first;
    idle, the pool goes back to one actor."""
    pool = ray.remote(StreamCoordinator).options(num_cpus=0.1).remote(
        checkpoint_dirs["gqa"], answerers=1, max_answerers=2, answer_target_ongoing=1, answer_idle_s=15.0)
    try:
        frames = {sid: video(18, seed=40 + i) for i, sid in enumerate(["p0", "p1"])}
        for sid, v in frames.items():
            ray.get(pool.create_stream.remote(sid, "rekv", CASES["rekv"]))
            ray.get(pool.ingest.remote(sid, v))
        ray.get([pool.ask.remote(sid, QUESTIONS[0], 5) for sid in frames for _ in range(3)])
        deadline = time.monotonic() + 120
        while ray.get(pool.pool.remote())["answerers_added"] < 1:
            assert time.monotonic() < deadline, ray.get(pool.pool.remote())
            time.sleep(0.2)
        assert [r["streams"] for r in ray.get(pool.pool.remote())["answerers"]] == [2, 2]
        ray.get(pool.ingest.remote("p0", video(6, seed=49)))  # an update after the new actor joined
        frames["p0"] = np.concatenate([frames["p0"], video(6, seed=49)])
        # least recently used first: consecutive questions alternate between the two actors
        answers = {sid: [ray.get(pool.ask.remote(sid, QUESTIONS[0], 5)) for _ in range(2)] for sid in frames}
        for sid, pair in answers.items():
            session = StreamSession(engine_model, method="rekv", **CASES["rekv"])
            session.add_frames(frames[sid])
            expected = session.ask(QUESTIONS[0], max_new_tokens=5)
            assert [a["token_ids"] for a in pair] == [expected.token_ids] * 2
        while ray.get(pool.pool.remote())["answerers_removed"] < 1:
            assert time.monotonic() < deadline + 60, ray.get(pool.pool.remote())
            time.sleep(0.5)
        assert len(ray.get(pool.pool.remote())["answerers"]) == 1
        assert ray.get(pool.ask.remote("p1", QUESTIONS[0], 5))["token_ids"] == answers["p1"][0]["token_ids"]
    finally:
        ray.kill(pool)


def test_an_answer_actor_the_cluster_cannot_place_is_given_up_and_the_pool_keeps_answering(
        ray_runtime, checkpoint_dirs, engine_model):
    """Answer actors need the session's single slot: the first takes it, so the one a busy spell
    starts is never placed (no autoscaler here). It is given up after its start timeout, the pool
    says so, and the first actor goes on answering exactly."""
    cramped = ray.remote(StreamCoordinator).options(num_cpus=0.1).remote(
        checkpoint_dirs["gqa"], answerers=1, max_answerers=2, answer_target_ongoing=1, answer_start_timeout_s=2.0,
        placement={"answerer": {"resources": {SINGLE_SLOT: 1}}})
    try:
        frames = video(12, seed=71)
        ray.get(cramped.create_stream.remote("c0", "rekv", CASES["rekv"]))
        ray.get(cramped.ingest.remote("c0", frames))
        ray.get([cramped.ask.remote("c0", QUESTIONS[0], 5) for _ in range(3)])  # starts a second actor
        deadline = time.monotonic() + 60
        while ray.get(cramped.pool.remote())["answerers_unplaced"] < 1:
            assert time.monotonic() < deadline, ray.get(cramped.pool.remote())
            time.sleep(0.2)
        pool = ray.get(cramped.pool.remote())
        assert len(pool["answerers"]) == 1 and pool["answerers_added"] == 0
        session = StreamSession(engine_model, method="rekv", **CASES["rekv"])
        session.add_frames(frames)
        assert ray.get(cramped.ask.remote("c0", QUESTIONS[0], 5))["token_ids"] == session.ask(QUESTIONS[0], 5).token_ids
    finally:
        ray.kill(cramped)


def test_a_stream_whose_every_replica_is_lost_says_so_and_can_be_recreated(ray_runtime, checkpoint_dirs, engine_model):
    """Kill the prefill actor and the only answer actor at once: they restart empty, no replica of
    the stream survives, so the stream is lost, as soon as the restarted answer actor says it holds
    nothing (not after restore_timeout_s). Its status says so, frames and questions get a typed
    error at once, and deleting and recreating it gives a working stream."""
    lone = ray.remote(StreamCoordinator).options(num_cpus=0.1).remote(
        checkpoint_dirs["gqa"], answerers=1, restore_timeout_s=3600.0)
    try:
        frames = video(24, seed=61)
        ray.get(lone.create_stream.remote("doomed", "rekv", CASES["rekv"]))
        ray.get(lone.ingest.remote("doomed", frames[:10]))
        workers = ray.get(lone.workers.remote())
        for actor in (workers["prefill"], *workers["answerers"]):
            ray.kill(actor, no_restart=False)
        with pytest.raises(StreamLostError):  # (the bound: nothing waits out restore_timeout_s)
            ray.get(lone.ingest.remote("doomed", frames[10:]), timeout=300)  # closes a segment: nowhere to commit it
        status = ray.get(lone.status.remote("doomed"))
        assert status["state"] == "lost" and "all were lost" in status["last_error"]
        assert stream_status("doomed", status, None)["state"] == "lost"  # as GET /v1/streams/{id} shows it
        with pytest.raises(StreamLostError):
            ray.get(lone.ask.remote("doomed", QUESTIONS[0], 3))
        ray.get(lone.delete_stream.remote("doomed"))
        ray.get(lone.create_stream.remote("doomed", "rekv", CASES["rekv"]))
        ray.get(lone.ingest.remote("doomed", frames))
        session = StreamSession(engine_model, method="rekv", **CASES["rekv"])
        session.add_frames(frames)
        assert ray.get(lone.ask.remote("doomed", QUESTIONS[0], 5))["token_ids"] == session.ask(QUESTIONS[0], 5).token_ids
        assert ray.get(lone.status.remote("doomed"))["state"] == "live"
    finally:
        ray.kill(lone)


@pytest.mark.parametrize("module", ["actors.coordinator", "actors.prefill", "actors.compressor", "actors.answerer",
                                    # what the HTTP replica passes to the coordinator with a question
                                    "pipeline.sampling", "pipeline.conversation"])
def test_what_a_handle_imports_is_torch_free(module):
    """Holding an actor's handle makes a process import the actor's module (Ray loads the class):
    it must not pull in torch/transformers. Decoder actors hold the coordinator's handle (0.9 GB
    per decoder process when it did); the coordinator holds the model actors' (a restarted one's
    takeover waited ~3.6 s for the imports) and unpickles a question's SamplingParams (~270 MB
    for good when pipeline.sampling imported torch)."""
    import subprocess

    code = f"import sys, {module}; print(sorted({{'torch', 'transformers'}} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


@given(st.lists(st.integers(1, 80), max_size=30), st.integers(1, 64))
def test_vision_calls_take_consecutive_chunks_up_to_the_frame_limit(sizes, limit):
    from actors.calls import groups as _groups

    groups = list(_groups(list(range(len(sizes))), sizes, limit))
    assert [i for group in groups for i in group] == list(range(len(sizes)))  # all, in order
    for group in groups:
        assert len(group) == 1 or sum(sizes[i] for i in group) <= limit  # a bigger chunk goes alone
    for group, after in zip(groups, groups[1:]):  # each call as full as the limit allows
        assert sum(sizes[i] for i in group) + sizes[after[0]] > limit
