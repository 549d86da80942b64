"""The HTTP API over real HTTP against the session's Serve app (tests/plugins/serve_app.py)."""

import io
import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.plugins.serve_app import MAX_JSON, MAX_UPLOAD, METRICS_TOKEN, MODEL_NAME, TOKEN_A, TOKEN_B, client
from tests.stages import scene_video as video

CLIP_FRAMES = 24
QUESTION = "what color was the star?"


def mpegts(frames: np.ndarray, fps: float = 4.0, **options) -> bytes:
    from pipeline.video_io import write_video

    buf = io.BytesIO()
    write_video(buf, frames, fps, container_format="mpegts", **options)
    return buf.getvalue()


def wait_ingested(http: httpx.Client, stream_id: str, frames: int | None = None, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = http.get(f"/v1/streams/{stream_id}")
        assert r.status_code == 200, r.text
        status = r.json()
        if status["source_state"] in ("finished", "failed", "stopped") and (
                frames is None or status["frames_ingested"] >= frames or status["source_state"] != "finished"):
            return status
        time.sleep(0.2)
    raise AssertionError(f"stream {stream_id} not ingested: {status}")


def ask_body(stream_id: str, question: str = QUESTION, max_tokens: int = 4, **extra) -> dict:
    return {"model": MODEL_NAME, "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": f"stream://{stream_id}"}}, {"type": "text", "text": question}]}],
        **extra}


@pytest.fixture(scope="module")
def cam(server):
    """Token A's stream "cam", fed a real MPEG-TS clip through the push route."""
    with client(server) as http:
        r = http.post("/v1/streams", json={"stream_id": "cam", "method": "rekv", "options": {"top_k": 4, "n_local": 24}})
        assert r.status_code == 201, r.text
        data = mpegts(video(CLIP_FRAMES, seed=1))
        r = http.post("/v1/streams/cam/chunks", content=data, headers={"Content-Type": "video/mp2t"})
        assert r.status_code == 202, r.text
        r = http.post("/v1/streams/cam/close", params={"wait_s": 60})
        assert r.status_code == 200, r.text
        status = wait_ingested(http, "cam", CLIP_FRAMES)
        assert status["source_state"] == "finished" and status["frames_ingested"] == CLIP_FRAMES, status
    return "cam"


def test_health_models_and_openapi(server):
    assert httpx.get(f"{server}/healthz", timeout=120).json()["status"] == "ok"
    with client(server) as http:
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == [MODEL_NAME]
        r = http.get("/openapi.json")
        assert r.status_code == 200, r.text
        paths = r.json()["paths"]
        assert {"/v1/streams", "/v1/streams/{stream_id}/chunks", "/v1/chat/completions"} <= set(paths)


def test_stream_lifecycle(server, cam):
    with client(server) as http:
        created = http.post("/v1/streams", json={"stream_id": "life"}).json()
        assert created["mode"] == "push" and created["source_state"] in ("starting", "running")
        data = mpegts(video(16, seed=2))
        half = len(data) // 2  # two numbered chunks of one container
        for seq, part in enumerate([data[:half], data[half:]]):
            r = http.post("/v1/streams/life/chunks", params={"seq": seq}, content=part,
                          headers={"Content-Type": "application/octet-stream"})
            assert r.status_code == 202, r.text
            assert r.json()["source_state"] in ("starting", "running") and r.json()["bytes_received"] == len(part)
        http.post("/v1/streams/life/close", params={"wait_s": 60})
        status = wait_ingested(http, "life", 16)
        assert status["frames_ingested"] == 16 and status["frames_dropped"] == 0 and status["mode"] == "push"
        assert status["retained_bytes"] > 0 and status["state"] == "live"
        assert status["batching"]["chunks"] >= status["batching"]["pushes"] >= 1
        assert {s["stream_id"] for s in http.get("/v1/streams").json()["data"]} >= {"life", "cam"}

        answer = http.post("/v1/chat/completions", json=ask_body("life")).json()
        assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"] is not None
        assert answer["evidence"] and all(e["frames"][1] <= 16 for e in answer["evidence"])
        segments = http.get("/v1/streams/life/segments").json()["data"]
        assert segments, "a question closes the open segment"

        assert http.delete("/v1/streams/life").json()["deleted"] is True
        assert http.get("/v1/streams/life").status_code == 404
        assert http.post("/v1/chat/completions", json=ask_body("life")).status_code == 404


def test_openai_client_plain_and_streaming(server, cam):
    from openai import OpenAI

    oai = OpenAI(base_url=f"{server}/v1", api_key=TOKEN_A, max_retries=0, timeout=120)
    messages = ask_body(cam, max_tokens=6)["messages"]
    plain = oai.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6)
    text = plain.choices[0].message.content
    assert isinstance(text, str) and plain.usage.completion_tokens >= 1
    assert plain.usage.prompt_tokens > 24  # the retrieved frames' tokens, the question, the template
    assert plain.model_extra["evidence"] and plain.model_extra["stream_id"] == cam

    chunks = list(oai.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text  # greedy: the same answer
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].model_extra["evidence"] == plain.model_extra["evidence"]
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(pieces) >= min(2, len(text.split()))  # an event per generated piece, not one for the whole answer

    with httpx.stream("POST", f"{server}/v1/chat/completions", json=ask_body(cam, stream=True),
                      headers={"Authorization": f"Bearer {TOKEN_A}"}, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


def test_auth_and_isolation(server, cam):
    assert httpx.get(f"{server}/v1/streams").status_code == 401
    with client(server, "wrong") as http:
        r = http.get("/v1/streams")
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
        assert http.post("/v1/chat/completions", json=ask_body(cam)).status_code == 401
    with client(server, TOKEN_B) as http:
        assert http.get(f"/v1/streams/{cam}").status_code == 404
        assert http.get(f"/v1/streams/{cam}/segments").status_code == 404
        assert http.post("/v1/chat/completions", json=ask_body(cam)).status_code == 404
        assert http.delete(f"/v1/streams/{cam}").status_code == 404
        assert http.post(f"/v1/streams/{cam}/chunks", content=b"x" * 10,
                         headers={"Content-Type": "video/mp2t"}).status_code == 404
        assert cam not in {s["stream_id"] for s in http.get("/v1/streams").json()["data"]}
        assert http.post("/v1/streams", json={"stream_id": cam}).status_code == 201  # B's own "cam"
        assert http.get(f"/v1/streams/{cam}").json()["frames_ingested"] == 0
        assert http.post("/v1/chat/completions", json=ask_body(cam)).status_code == 409  # no frames yet
        assert http.delete(f"/v1/streams/{cam}").status_code == 200
    with client(server) as http:
        assert http.get(f"/v1/streams/{cam}").json()["frames_ingested"] == CLIP_FRAMES
        assert http.post("/v1/chat/completions", json=ask_body(cam)).status_code == 200


def test_bad_requests_are_4xx_and_leave_other_streams_answering(server, cam):
    def err(r, status):
        assert r.status_code == status, (r.status_code, r.text)
        assert set(r.json()["error"]) == {"type", "message"}
        return r.json()["error"]

    with client(server) as http:
        before = http.post("/v1/chat/completions", json=ask_body(cam)).json()["choices"][0]["message"]["content"]
        assert err(http.get("/v1/streams/nope"), 404)["type"] == "UnknownStreamError"
        err(http.post("/v1/chat/completions", json=ask_body("nope")), 404)
        err(http.get("/v1/nothing-here"), 404)
        # corrupt upload: accepted as bytes, the stream's source fails, nothing else is touched
        assert http.post("/v1/streams", json={"stream_id": "broken"}).status_code == 201
        r = http.post("/v1/streams/broken/chunks", content=b"not a video at all" * 500,
                      headers={"Content-Type": "video/mp2t"})
        assert r.status_code in (202, 409), r.text
        http.post("/v1/streams/broken/close", params={"wait_s": 30})
        status = wait_ingested(http, "broken")
        assert status["source_state"] == "failed" and "VideoDecodeError" in status["last_error"], status
        err(http.post("/v1/streams/broken/chunks", content=b"\0" * 10, headers={"Content-Type": "video/mp2t"}), 409)
        err(http.post("/v1/chat/completions", json=ask_body("broken")), 409)  # no frames
        # wrong content types
        err(http.post(f"/v1/streams/{cam}/chunks", json={"a": 1}), 415)
        err(http.post("/v1/streams", content=b"stream_id=x", headers={"Content-Type": "text/plain"}), 422)
        # huge bodies
        err(http.post(f"/v1/streams/{cam}/chunks", content=b"\0" * (MAX_UPLOAD + 1),
                      headers={"Content-Type": "video/mp2t"}), 413)
        err(http.post("/v1/chat/completions", json=ask_body(cam, question="x " * MAX_JSON)), 413)
        # malformed or invalid JSON
        err(http.post("/v1/streams", content=b"{not json", headers={"Content-Type": "application/json"}), 400)
        err(http.post("/v1/chat/completions", content=b'{"model": ', headers={"Content-Type": "application/json"}), 400)
        err(http.post("/v1/streams", json={"stream_id": "bad/id"}), 422)
        err(http.post("/v1/streams", json={"method": "no-such-method"}), 422)
        err(http.post("/v1/streams", json={"options": {"no_such_knob": 1}}), 422)
        err(http.post("/v1/streams", json={"source": "file:///etc/passwd"}), 400)
        err(http.post("/v1/streams", json={"source": "ftp://example.com/x.mp4"}), 400)
        err(http.post("/v1/streams", json={"stream_id": cam}), 422)  # already in use
        # questions: too long (in characters, then in tokens), empty, no video, bad max_tokens, unknown model
        err(http.post("/v1/chat/completions", json=ask_body(cam, question="word " * 2000)), 422)
        err(http.post("/v1/chat/completions", json=ask_body(cam, question="star " * 1000)), 422)
        err(http.post("/v1/chat/completions", json=ask_body(cam, question="   ")), 422)
        err(http.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": [
            {"role": "user", "content": QUESTION}]}), 422)
        err(http.post("/v1/chat/completions", json=ask_body(cam, max_tokens=0)), 422)
        err(http.post("/v1/chat/completions", json={**ask_body(cam), "model": "gpt-4"}), 404)
        err(http.post("/v1/chat/completions", json=ask_body(cam, question=QUESTION).__or__(
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})), 422)

        after = http.post("/v1/chat/completions", json=ask_body(cam))
        assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == before
        assert http.get(f"/v1/streams/{cam}").json()["frames_ingested"] == CLIP_FRAMES
        assert http.delete("/v1/streams/broken").status_code == 200


@pytest.fixture(scope="module")
def clip_url(tmp_path_factory):
    """An mp4 served over loopback HTTP (the decoder actor pulls it like any http source)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from pipeline.video_io import write_video

    root = tmp_path_factory.mktemp("www")
    write_video(root / "clip.mp4", video(20, seed=5), fps=4.0)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/clip.mp4"
    httpd.shutdown()


def test_pull_source_and_one_shot_url(server, cam, clip_url):
    with client(server) as http:
        r = http.post("/v1/streams", json={"stream_id": "pulled", "source": clip_url})
        assert r.status_code == 201 and r.json()["mode"] == "pull", r.text
        status = wait_ingested(http, "pulled", 20)
        assert status["source_state"] == "finished" and status["frames_ingested"] == 20, status
        err = http.post("/v1/streams/pulled/chunks", content=b"\0" * 10, headers={"Content-Type": "video/mp4"})
        assert err.status_code == 409  # not a push-mode stream
        assert http.post("/v1/chat/completions", json=ask_body("pulled")).json()["evidence"]
        assert http.delete("/v1/streams/pulled").status_code == 200

        body = ask_body("x")
        body["messages"][0]["content"][0]["video_url"]["url"] = clip_url
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.json()["evidence"] and r.json()["stream_id"] is None, r.text
        assert {s["stream_id"] for s in http.get("/v1/streams").json()["data"]} == {cam}  # one-shot stream gone
        body["messages"][0]["content"][0]["video_url"]["url"] = "file:///etc/passwd"
        assert http.post("/v1/chat/completions", json=body).status_code == 400  # local files not enabled


def test_metrics(server, cam):
    with client(server) as http:
        http.post("/v1/chat/completions", json=ask_body(cam))
    with client(server) as http:
        text = http.get("/metrics").text
    assert "streamkv_answer_latency_seconds_bucket" in text
    lines = [line for line in text.splitlines() if line.startswith("streamkv_frames_ingested_total{")
             and 'stream="cam"' in line]
    assert lines and float(lines[0].rsplit(" ", 1)[1]) == CLIP_FRAMES
    assert any(line.startswith("streamkv_retained_kv_bytes{") for line in text.splitlines())
    assert "streamkv_index_healthy 1.0" in text.splitlines()  # the segment index, written as it goes
    with client(server) as http:
        index = http.get("/v1/streams/cam").json()["index"]
    assert index["state"] == "healthy" and index["pending_writes"] == 0, index


def test_a_pushed_source_that_goes_quiet_ends_after_its_idle_timeout(server):
    with client(server) as http:
        r = http.post("/v1/streams", json={"stream_id": "quiet", "idle_timeout_s": 1.0})
        assert r.status_code == 201, r.text
        data = mpegts(video(48, seed=3))
        assert http.post("/v1/streams/quiet/chunks", content=data, headers={"Content-Type": "video/mp2t"}).status_code == 202
        status = wait_ingested(http, "quiet")  # never closed: the idle timeout ends it
        assert status["source_state"] == "failed" and "no data for 1.0 s" in status["last_error"], status
        # what was decoded before is kept and answerable (the demuxer may still hold the last frames)
        assert 0 < status["frames_ingested"] <= 48, status
        assert http.post("/v1/chat/completions", json=ask_body("quiet")).status_code == 200
        # it takes no more chunks, until it is given a new source: the stream goes on after its frames
        assert http.post("/v1/streams/quiet/chunks", content=data, headers={"Content-Type": "video/mp2t"}).status_code == 409
        r = http.post("/v1/streams/quiet/source", json={"idle_timeout_s": 1.0})
        assert r.status_code == 200 and r.json()["source_state"] in ("starting", "running"), r.text
        assert http.post("/v1/streams/quiet/chunks", content=data, headers={"Content-Type": "video/mp2t"}).status_code == 202
        more = wait_ingested(http, "quiet")
        assert more["frames_ingested"] > status["frames_ingested"] and more["last_time"] > status["last_time"], more
        assert more["frames_decoded"] > status["frames_decoded"]  # counted over both sources
        assert http.delete("/v1/streams/quiet").status_code == 200


def test_the_service_keeps_its_streams_when_its_coordinator_process_dies(server, cam, coordinator_name):
    """Ray restarts the coordinator, which takes the streams over: requests made while its process
    is down wait for the new one (no 503), and get the same status and answer as before; an upload
    in progress goes on, every frame of it ingested once; a closed one stays closed (409) until
    the stream gets a new source."""
    import ray

    from actors.coordinator import NAMESPACE

    with client(server) as http:
        # an upload in progress: one MPEG-TS stream (a keyframe every 4 frames), cut in two
        data = mpegts(video(32, seed=8), fps=4.0, gop_size=4)
        halves = [data[: len(data) // 2 // 188 * 188], data[len(data) // 2 // 188 * 188 :]]  # whole TS packets
        assert http.post("/v1/streams", json={"stream_id": "upload"}).status_code == 201
        assert http.post("/v1/streams/upload/chunks", content=halves[0], params={"seq": 0},
                         headers={"Content-Type": "video/mp2t"}).status_code == 202
        deadline = time.monotonic() + 60
        while (uploaded := http.get("/v1/streams/upload").json())["frames_ingested"] < 8:
            assert time.monotonic() < deadline, uploaded
            time.sleep(0.2)
        before = http.get(f"/v1/streams/{cam}").json()
        answer = http.post("/v1/chat/completions", json=ask_body(cam, max_tokens=6)).json()
        coordinator = ray.get_actor(coordinator_name, namespace=NAMESPACE)
        pid = ray.get(coordinator.__ray_call__.remote(lambda _: os.getpid()))
        ray.kill(coordinator, no_restart=False)
        wait_until_gone(pid)  # Ray refuses calls to it until the new process is up
        # the upload goes on where it was (its decoder outlived the coordinator's process)
        r = http.post("/v1/streams/upload/chunks", content=halves[1], params={"seq": 1},
                      headers={"Content-Type": "video/mp2t"})
        assert r.status_code == 202, r.text
        r = http.get(f"/v1/streams/{cam}")
        assert r.status_code == 200 and r.json()["recoveries"] > before["recoveries"], r.text  # the new process's
        after = r.json()
        assert (after["frames_ingested"], after["segments"]) == (before["frames_ingested"], before["segments"])
        again = http.post("/v1/chat/completions", json=ask_body(cam, max_tokens=6)).json()
        assert again["choices"][0]["message"]["content"] == answer["choices"][0]["message"]["content"]
        assert again["evidence"] == answer["evidence"]
        assert http.post("/v1/streams/upload/close", params={"wait_s": 60}).status_code == 200
        resumed = wait_ingested(http, "upload")
        assert (resumed["mode"], resumed["frames_ingested"], resumed["frames_dropped"]) == ("push", 32, 0), resumed
        assert resumed["last_time"] == pytest.approx(31 / 4.0)
        clip = mpegts(video(8, seed=7))
        r = http.post(f"/v1/streams/{cam}/chunks", content=clip, headers={"Content-Type": "video/mp2t"})
        assert r.status_code == 409 and "ended" in r.json()["error"]["message"], r.text
        # a new source: the stream goes on, its memory kept
        r = http.post(f"/v1/streams/{cam}/source", json={})
        assert r.status_code == 200 and r.json()["mode"] == "push", r.text
        assert http.post(f"/v1/streams/{cam}/source", json={}).status_code == 409  # one runs already
        assert http.post(f"/v1/streams/{cam}/chunks", content=clip, params={"seq": 0},
                         headers={"Content-Type": "video/mp2t"}).status_code == 202
        assert http.post(f"/v1/streams/{cam}/close", params={"wait_s": 60}).status_code == 200
        status = wait_ingested(http, cam, CLIP_FRAMES + 8)
        assert status["frames_ingested"] == CLIP_FRAMES + 8 and status["last_time"] > after["last_time"], status


def wait_until_gone(pid: int) -> None:
    """Until process `pid` (on this machine) has exited; a zombie has."""
    deadline = time.monotonic() + 60
    while True:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except FileNotFoundError:
            return
        assert time.monotonic() < deadline, f"process {pid} still runs"
        time.sleep(0.05)


def test_a_lost_stream_says_so_and_answers_409(server, coordinator_name):
    """Every replica of the streams' memory killed at once (the prefill and answer actors): a
    stream that then commits a segment is lost, for the client to delete and create again. Last
    in the module: it loses the other streams too."""
    import ray

    from actors.coordinator import NAMESPACE

    with client(server) as http:
        assert http.post("/v1/streams", json={"stream_id": "doomed"}).status_code == 201
        http.post("/v1/streams/doomed/chunks", content=mpegts(video(12, seed=9)), params={"seq": 0},
                  headers={"Content-Type": "video/mp2t"})
        wait = http.post("/v1/streams/doomed/close", params={"wait_s": 60})
        assert wait.status_code == 200 and wait.json()["frames_ingested"] == 12, wait.text
        workers = ray.get(ray.get_actor(coordinator_name, namespace=NAMESPACE).workers.remote())
        for actor in [workers["prefill"], *workers["answerers"]]:
            ray.kill(actor, no_restart=False)
        r = http.post("/v1/chat/completions", json=ask_body("doomed"))  # closes the open segment: a commit
        assert r.status_code == 409 and r.json()["error"]["type"] == "StreamLostError", r.text
        status = http.get("/v1/streams/doomed").json()
        assert status["state"] == "lost" and "lost at once" in status["last_error"], status
        assert status["retained_bytes"] is None
        # reading it again tries no restore (each would wait restore_timeout_s for a replica)
        assert http.get("/v1/streams/doomed").json()["recoveries"] == status["recoveries"]
        metrics = http.get("/metrics").text.splitlines()  # the other streams: lost too
        assert [m.rsplit(" ", 1)[1] for m in metrics if m.startswith("streamkv_stream_lost{")
                and 'stream="doomed"' in m] == ["1.0"]
        assert http.post("/v1/chat/completions", json=ask_body("doomed")).status_code == 409
        assert http.delete("/v1/streams/doomed").status_code == 200
        assert http.post("/v1/streams", json={"stream_id": "doomed"}).status_code == 201  # created again
