"""The Ray pipeline and the HTTP service host Qwen3-VL as they host Qwen2.5-VL (test_qwen_ray.py):
its units vary in length (each carries its "<t seconds>" text) and its deepstack features travel
with the visual tokens, from the vision call through the compressor (a restarted one too) to the
prefill actor, so answers and evidence equal the single-process engine's; replicas rebuilt from
the wire (updates, snapshots) answer the same."""

import pickle
import uuid

import pytest
import ray

from pipeline import StreamSession, load_model
from tests.test_qwen_engine import QUESTION, frames_for
from tests.test_qwen_ray import CHUNKS, engine_answers, http_answer_equals_the_engine, ray_answers

CHECKPOINT = "qwen3-gqa"  # grouped-query, 3 layers, 16 visual tokens per temporal patch
COORDINATOR = f"qwen3-ray-test-{uuid.uuid4().hex[:8]}"  # named: the HTTP check's app uses it too


def cases(n: int) -> dict[str, dict]:
    """test_qwen_ray's knobs, with windows of whole units: a unit here is its n visual tokens and
    8-9 more (timestamp text, vision markers)."""
    unit = n + 9
    return {"rekv": {"top_k": 2, "n_local": 2 * unit, "segment_frames": 3},
            "streamkv": {"keep_ratio": 0.5, "top_k": 2, "min_frames": 2, "n_local": 2 * unit},
            "livevlm": {"budget_tokens": 3 * n, "n_local": 2 * unit, "vsb_queries": 4, "page_tokens": 4}}


@pytest.fixture(scope="module")
def qwen3_engine(qwen3_dirs):
    return load_model(qwen3_dirs[CHECKPOINT])


@pytest.fixture(scope="module")
def qwen3_coordinator(ray_runtime, qwen3_dirs, redis_server):
    from deploy.ingest import named_coordinator, stop_coordinator

    yield named_coordinator(COORDINATOR, qwen3_dirs[CHECKPOINT], index_url=redis_server.url)
    stop_coordinator(COORDINATOR)


@pytest.mark.parametrize("method", ["rekv", "streamkv", "livevlm"])
def test_qwen3_answers_and_evidence_equal_the_engine(qwen3_coordinator, qwen3_engine, method):
    """Odd chunks split temporal patches; questions pad a lone frame. For streamkv the compressor
    is killed after the first chunk (Ray restarts it empty): the coordinator replays the open
    segment's units, deepstack features included, and the waiting frame."""
    options = cases(qwen3_engine.dims.tokens_per_unit)[method]
    frames = frames_for(qwen3_engine, sum(CHUNKS), seed=21)
    expected = engine_answers(qwen3_engine, method, options, frames)
    assert any(evidence for _, evidence in expected)  # retrieval happened: the evidence means something

    def kill_compressor():
        ray.kill(ray.get(qwen3_coordinator.workers.remote())["compressor"], no_restart=False)

    restart = kill_compressor if method == "streamkv" else None
    assert ray_answers(qwen3_coordinator, f"q3-{method}", method, options, frames, after_first=restart) == expected
    status = ray.get(qwen3_coordinator.status.remote(f"q3-{method}"))
    assert status["frames_ingested"] == sum(CHUNKS)
    assert (status["recoveries"] >= 1) == (restart is not None)
    ray.get(qwen3_coordinator.delete_stream.remote(f"q3-{method}"))


@pytest.mark.parametrize("method", ["rekv", "livevlm", "uniform"])
def test_qwen3_replicas_from_the_wire_answer_the_same(qwen3_engine, method):
    """Updates and a snapshot of a Qwen3-VL stream (units of different lengths: timestamps of one
    and two digits; the uniform baseline's visual tokens with their deepstack features) rebuild
    replicas that answer as the engine's memory does."""
    from cache_store.wire import pack_snapshot, pack_update, unpack_snapshot, unpack_update
    from pipeline.memory import StreamMemory

    options = {**cases(qwen3_engine.dims.tokens_per_unit), "uniform": {"top_k": 3}}[method]
    session = StreamSession(qwen3_engine, method=method, frame_rate=0.5, **options)  # 2 s a frame: 10.0 s onwards
    replica = StreamMemory(qwen3_engine.dims, session.config, session.store.sinks)
    encode = session._encode_segment

    def encode_and_ship(segment):
        update = encode(segment)
        wire = pickle.loads(pickle.dumps(pack_update(update, stream_id="s", model_id="m")))  # as Ray ships it
        replica.apply(unpack_update(wire, "cpu", qwen3_engine.dtype))
        return update

    session._encode_segment = encode_and_ship
    session.add_frames(frames_for(qwen3_engine, 13, seed=25))
    session.flush()
    lengths = {u.tokens for u in session.store.units.values()}
    assert method == "uniform" or len(lengths) > 1  # units of different lengths
    snapshot = pickle.loads(pickle.dumps(pack_snapshot(session.store, stream_id="s", model_id="m")))
    from_snapshot = unpack_snapshot(snapshot, qwen3_engine.dims, session.config, "cpu", qwen3_engine.dtype)
    expected = session.answerer.ask(session.store, QUESTION, max_new_tokens=5)
    assert expected.evidence
    for memory in (replica, from_snapshot):
        got = session.answerer.ask(memory, QUESTION, max_new_tokens=5)
        assert got.token_ids == expected.token_ids
        # scores to float rounding: the engine's keys are strided views ([n, Hkv, d] storage), the
        # wire's contiguous, so a block's mean key sums in another order
        assert [(e.frames, e.times, e.layers) for e in got.evidence] == [(e.frames, e.times, e.layers) for e in expected.evidence]
        assert [e.score for e in got.evidence] == pytest.approx([e.score for e in expected.evidence], rel=1e-5, abs=1e-6)
        assert memory.memory()["total"] == session.store.memory()["total"]


def test_the_http_service_hosts_a_qwen3_stream(server, checkpoint_dirs, qwen3_dirs, qwen3_engine, qwen3_coordinator):
    """As test_qwen_ray's HTTP check, on the Qwen3-VL checkpoint (an app on this module's
    coordinator): a pushed MPEG-TS upload of 11 frames, and the answer over HTTP is the engine's
    on the same decoded frames."""
    http_answer_equals_the_engine(server, checkpoint_dirs, qwen3_dirs[CHECKPOINT], qwen3_engine, "qwen3",
                                  cases(qwen3_engine.dims.tokens_per_unit)["rekv"], coordinator=COORDINATOR)
