"""Stream creation never hangs (issue 23 item 2), over real HTTP with real Ray.

A Serve app of its own whose coordinator places decoder hosts, for one source each, on the
runtime's one SINGLE_SLOT unit: one stream's decoder fills the cluster, so the next creation
cannot be placed (and a host left without sources goes after 1 s). It must answer a
JSON 503 with Retry-After within start_timeout_s, leave no stream and no decoder actor, and free
its id; past max_streams creation answers 429 at once; a request cancelled midway leaves nothing;
and /healthz, reads and questions answer while creations wait.
"""

import concurrent.futures
import contextlib
import time
import uuid

import httpx
import pytest
import ray

from tests.plugins.ray_runtime import SINGLE_SLOT
from tests.plugins.serve_app import MODEL_NAME, client, run_app
from tests.stages import scene_video
from tests.test_http_api import mpegts

START_TIMEOUT_S = 8.0
MAX_STREAMS = 2


@pytest.fixture(scope="module")
def capacity(server, checkpoint_dirs):
    """(base URL, coordinator name) of the app whose decoders need the SINGLE_SLOT unit."""
    from ray import serve

    from deploy.ingest import named_coordinator, stop_coordinator

    name = f"capacity-test-{uuid.uuid4().hex[:8]}"
    # started here with the placement the app's settings cannot express; the app adopts it by name
    named_coordinator(name, checkpoint_dirs["gqa"], "cpu", 1, None, 0.05, num_cpus=0.05,
                      placement={"decoder": {"resources": {SINGLE_SLOT: 1}}}, decoder_capacity=1, decoder_idle_s=1.0)
    url = run_app(checkpoint_dirs, name, f"{server}/capacity", "streamkv-capacity-test", "/capacity",
                  start_timeout_s=START_TIMEOUT_S, max_streams=MAX_STREAMS)
    try:
        yield url, name
    finally:
        serve.delete("streamkv-capacity-test")
        stop_coordinator(name)


def decoders(coordinator: str) -> list[str]:
    """The coordinator's decoder hosts that exist (alive or waiting to be placed)."""
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"{coordinator}.decoder."))


def eventually_no_more_decoders(coordinator: str, count: int) -> list[str]:
    """The decoders once at most `count` remain (a killed actor's name is released shortly after)."""
    deadline = time.monotonic() + 30
    while len(found := decoders(coordinator)) > count and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


@contextlib.contextmanager
def holding(http: httpx.Client, coordinator: str, stream_id: str):
    """A stream whose decoder takes the slot for the block; deleted after it (with its decoder)."""
    assert http.post("/v1/streams", json={"stream_id": stream_id}).status_code == 201
    try:
        yield
    finally:
        assert http.delete(f"/v1/streams/{stream_id}").status_code == 200
    assert eventually_no_more_decoders(coordinator, 0) == []


def feed(http: httpx.Client, stream_id: str, frames: int = 8) -> None:
    r = http.post(f"/v1/streams/{stream_id}/chunks", content=mpegts(scene_video(frames, seed=5)),
                  headers={"Content-Type": "video/mp2t"})
    assert r.status_code == 202, r.text
    r = http.post(f"/v1/streams/{stream_id}/close", params={"wait_s": 60})
    assert r.status_code == 200 and r.json()["frames_ingested"] == frames, r.text


def create(url: str, stream_id: str) -> httpx.Response:
    with client(url) as http:
        return http.post("/v1/streams", json={"stream_id": stream_id}, timeout=START_TIMEOUT_S + 60)


def test_unplaceable_decoder_is_503_and_leaves_nothing(capacity):
    url, coordinator = capacity
    with client(url) as http:
        with holding(http, coordinator, "holder"):  # its decoder takes the slot
            r = http.post("/v1/streams", json={"stream_id": "waiting"}, timeout=START_TIMEOUT_S + 60)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["type"] == "CapacityError", r.json()
            assert int(r.headers["Retry-After"]) >= 1
            assert http.get("/v1/streams/waiting").status_code == 404
            assert [s["stream_id"] for s in http.get("/v1/streams").json()["data"]] == ["holder"]
            assert len(eventually_no_more_decoders(coordinator, 1)) == 1  # the holder's only
        # the slot is free: the id that failed is free again too
        with holding(http, coordinator, "waiting"):
            pass


def test_max_streams_429_while_reads_health_and_questions_answer(capacity):
    url, coordinator = capacity
    with client(url) as http:
        with holding(http, coordinator, "busy"):  # its decoder takes the slot
            feed(http, "busy")
            # its upload finished, which let its host's room go (a finished source holds nothing):
            # a new upload takes it again
            assert http.post("/v1/streams/busy/source", json={}).status_code == 200
            with concurrent.futures.ThreadPoolExecutor(8) as pool, client(url) as other:
                creations = [pool.submit(create, url, f"many-{i}") for i in range(4)]
                # while they wait for room: health, a read and a question are answered
                answered = []
                while not all(c.done() for c in creations) or not answered:
                    assert httpx.get(f"{url}/healthz", timeout=60).status_code == 200
                    assert other.get("/v1/streams/busy", timeout=60).status_code == 200
                    r = other.post("/v1/chat/completions", timeout=60, json={
                        "model": MODEL_NAME, "max_tokens": 2, "messages": [{"role": "user", "content": [
                            {"type": "video_url", "video_url": {"url": "stream://busy"}},
                            {"type": "text", "text": "what is there?"}]}]})
                    assert r.status_code == 200, r.text
                    answered.append(any(not c.done() for c in creations))
                codes = sorted(c.result().status_code for c in creations)
            # one creation got past the limit check and waited for a decoder that found no room;
            # the others found the server at max_streams (the stream + that one)
            assert codes == [429, 429, 429, 503], codes
            assert answered[0], "no request was answered while the creations waited"
            r = [c.result() for c in creations if c.result().status_code == 429][0]
            assert r.json()["error"]["type"] == "CapacityError" and int(r.headers["Retry-After"]) >= 1
            assert [s["stream_id"] for s in http.get("/v1/streams").json()["data"]] == ["busy"]
            assert len(eventually_no_more_decoders(coordinator, 1)) == 1


def test_cancelled_creation_leaves_nothing(capacity):
    url, coordinator = capacity
    with client(url) as http:
        with holding(http, coordinator, "first"):  # its decoder takes the slot
            with pytest.raises(httpx.ReadTimeout):  # the client gives up while the decoder waits for room
                http.post("/v1/streams", json={"stream_id": "gone"}, timeout=1.0)
            time.sleep(START_TIMEOUT_S + 1)  # past the bound: whatever the cancelled call made is undone
            assert [s["stream_id"] for s in http.get("/v1/streams").json()["data"]] == ["first"]
            assert http.get("/v1/streams/gone").status_code == 404
            assert len(eventually_no_more_decoders(coordinator, 1)) == 1
        with holding(http, coordinator, "gone"):  # its id is free again
            pass
