"""The Ray pipeline hosts Qwen2.5-VL: frames are paired into temporal patches in stream order
whatever the chunking, a question pads a lone last frame as the engine does, and answers and
evidence equal the single-process engine's; a frame waiting for its pair survives a restarted
compressor (it is kept there, with the open segment)."""

import pytest
import ray

from actors.coordinator import StreamCoordinator
from pipeline import StreamSession, load_model
from tests.test_qwen_engine import QUESTION, frames_for

CHUNKS = [3, 4, 1, 5]  # odd sizes split temporal patches
ASK_AFTER = {1, 3}  # after 7 frames (a lone one padded) and after 13


def cases(n: int) -> dict[str, dict]:
    """Knobs small enough that 13 frames compress and retrieve (n: tokens per unit)."""
    return {"rekv": {"top_k": 2, "n_local": 2 * n, "segment_frames": 3},
            "streamkv": {"keep_ratio": 0.5, "top_k": 2, "min_frames": 2, "n_local": 2 * n},
            "livevlm": {"budget_tokens": 3 * n, "n_local": 2 * n, "vsb_queries": 4, "page_tokens": 4}}


@pytest.fixture(scope="module")
def qwen_engine(qwen_dirs):
    return load_model(qwen_dirs["qwen-gqa"])


@pytest.fixture(scope="module")
def qwen_coordinator(ray_runtime, qwen_dirs, redis_server):
    handle = ray.remote(StreamCoordinator).options(num_cpus=0.1).remote(qwen_dirs["qwen-gqa"],
                                                                       index_url=redis_server.url)
    yield handle
    ray.kill(handle)


def engine_answers(model, method, options, frames):
    session = StreamSession(model, method=method, **options)
    answers, start = [], 0
    for i, size in enumerate(CHUNKS):
        session.add_frames(frames[start : start + size])
        start += size
        if i in ASK_AFTER:
            answer = session.ask(QUESTION, max_new_tokens=6)
            answers.append((answer.token_ids, [list(e.frames) for e in answer.evidence]))
    return answers


def ray_answers(coordinator, stream_id, method, options, frames, after_first=None):
    ray.get(coordinator.create_stream.remote(stream_id, method, options))
    answers, start = [], 0
    for i, size in enumerate(CHUNKS):
        assert ray.get(coordinator.ingest.remote(stream_id, frames[start : start + size])) == start + size
        start += size
        if i == 0 and after_first is not None:
            after_first()
        if i in ASK_AFTER:
            answer = ray.get(coordinator.ask.remote(stream_id, QUESTION, 6))
            answers.append((answer["token_ids"], [e["frames"] for e in answer["evidence"]]))
    return answers


@pytest.mark.parametrize("method", ["rekv", "streamkv", "livevlm"])
def test_qwen_answers_and_evidence_equal_the_engine(qwen_coordinator, qwen_engine, method):
    options = cases(qwen_engine.dims.tokens_per_unit)[method]
    frames = frames_for(qwen_engine, sum(CHUNKS), seed=21)
    expected = engine_answers(qwen_engine, method, options, frames)
    assert any(evidence for _, evidence in expected)  # retrieval happened: the evidence means something
    assert ray_answers(qwen_coordinator, f"q-{method}", method, options, frames) == expected
    status = ray.get(qwen_coordinator.status.remote(f"q-{method}"))
    assert status["frames_ingested"] == sum(CHUNKS)
    ray.get(qwen_coordinator.delete_stream.remote(f"q-{method}"))


def test_a_frame_waiting_for_its_pair_survives_a_restarted_compressor(qwen_coordinator, qwen_engine):
    """After 3 frames one waits for its pair; the compressor is killed (Ray restarts it empty):
    the coordinator gives it back the open segment's patches and the waiting frame, so the
    answers are the engine's."""
    options = cases(qwen_engine.dims.tokens_per_unit)["rekv"]
    frames = frames_for(qwen_engine, sum(CHUNKS), seed=22)
    expected = engine_answers(qwen_engine, "rekv", options, frames)

    def kill_compressor():
        ray.kill(ray.get(qwen_coordinator.workers.remote())["compressor"], no_restart=False)

    assert ray_answers(qwen_coordinator, "q-kill", "rekv", options, frames, after_first=kill_compressor) == expected
    assert ray.get(qwen_coordinator.status.remote("q-kill"))["recoveries"] >= 1
    ray.get(qwen_coordinator.delete_stream.remote("q-kill"))


def test_a_qwen_file_source_is_decoded_paired_and_answered_as_the_engine(qwen_coordinator, qwen_engine, tmp_path):
    """Through a decoder actor (chunks of 3 frames, 4 in flight, taken in seq order): every frame
    is ingested and the answer is the engine's on the same decoded frames and times."""
    import numpy as np

    from pipeline.decode import DecodeConfig, open_source
    from pipeline.video_io import write_video
    from tests.test_ray_pipeline import wait_source

    path = str(tmp_path / "qwen.mp4")
    write_video(path, frames_for(qwen_engine, 11, seed=23), fps=2.0)
    decoded = list(open_source(path, DecodeConfig()))
    options = cases(qwen_engine.dims.tokens_per_unit)["rekv"]
    ray.get(qwen_coordinator.create_stream.remote("q-file", "rekv", options))
    ray.get(qwen_coordinator.attach_source.remote("q-file", path, None, "block", 3, 4))
    status = wait_source(qwen_coordinator, "q-file")
    assert status["source_state"] == "finished" and status["frames_ingested"] == len(decoded) == 11
    answer = ray.get(qwen_coordinator.ask.remote("q-file", QUESTION, 6))
    session = StreamSession(qwen_engine, method="rekv", **options)
    session.add_frames(np.stack([d.image for d in decoded]), [d.time for d in decoded])
    expected = session.ask(QUESTION, max_new_tokens=6)
    assert answer["token_ids"] == expected.token_ids
    assert [e["frames"] for e in answer["evidence"]] == [list(e.frames) for e in expected.evidence]
    ray.get(qwen_coordinator.delete_stream.remote("q-file"))


def test_the_http_service_hosts_a_qwen_stream(server, checkpoint_dirs, qwen_dirs, qwen_engine):
    """A Serve app with model_dir on the Qwen checkpoint: a pushed MPEG-TS upload of 11 frames is
    ingested whole, and the answer over HTTP is the engine's on the same decoded frames."""
    http_answer_equals_the_engine(server, checkpoint_dirs, qwen_dirs["qwen-gqa"], qwen_engine, "qwen",
                                  cases(qwen_engine.dims.tokens_per_unit)["rekv"])


def http_answer_equals_the_engine(server, checkpoint_dirs, model_dir, engine, tag, options, coordinator=None):
    """(test_the_http_service_hosts_a_qwen_stream, on the checkpoint at `model_dir`) `coordinator`:
    the name of a running coordinator of that checkpoint for the app to use (its model actors are
    warm), else the app starts its own, stopped afterwards."""
    import uuid

    import numpy as np
    from ray import serve

    from deploy.ingest import stop_coordinator
    from pipeline.decode import DecodeConfig, open_source
    from tests.plugins.serve_app import client, run_app
    from tests.test_http_api import mpegts, wait_ingested

    name = coordinator or f"{tag}-http-{uuid.uuid4().hex[:8]}"
    app = f"streamkv-{tag}-test"
    url = run_app(checkpoint_dirs, name, f"{server}/{tag}", app, f"/{tag}", model_dir=model_dir, model_name=f"tiny-{tag}")
    try:
        data = mpegts(frames_for(engine, 11, seed=24), fps=2.0)
        with client(url) as http:
            assert http.post("/v1/streams", json={"stream_id": "qcam", "method": "rekv", "options": options}).status_code == 201
            assert http.post("/v1/streams/qcam/chunks", content=data, headers={"Content-Type": "video/mp2t"}).status_code == 202
            http.post("/v1/streams/qcam/close", params={"wait_s": 60})
            status = wait_ingested(http, "qcam", 11)
            assert status["source_state"] == "finished" and status["frames_ingested"] == 11, status
            answer = http.post("/v1/chat/completions", json={"model": f"tiny-{tag}", "max_tokens": 6, "messages": [
                {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "stream://qcam"}},
                                             {"type": "text", "text": QUESTION}]}]})
            assert answer.status_code == 200, answer.text
            answer = answer.json()
        decoded = list(open_source(data, DecodeConfig()))
        session = StreamSession(engine, method="rekv", **options)
        session.add_frames(np.stack([d.image for d in decoded]), [d.time for d in decoded])
        expected = session.ask(QUESTION, max_new_tokens=6)
        assert expected.evidence  # retrieval happened
        assert [e["frames"] for e in answer["evidence"]] == [list(e.frames) for e in expected.evidence]
        assert answer["choices"][0]["message"]["content"] == expected.text
    finally:
        serve.delete(app)
        if coordinator is None:
            stop_coordinator(name)
