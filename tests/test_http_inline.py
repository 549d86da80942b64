"""Inline videos (issue 21, item 1) as the `openai` client and vLLM's own tests send them, over
real HTTP against the session's Serve app: data:video/* files (MP4, WebM, Matroska, MPEG-TS),
vLLM's comma-joined base64 JPEG frames, an image_url part as a one-frame video, their own size
limit, and one video per request."""

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.plugins.serve_app import MAX_INLINE, MAX_JSON, MODEL_NAME, TOKEN_A, client
from tests.stages import scene_video as video
from tests.test_http_api import QUESTION

FRAMES = 12


def encoded(container: str, codec: str = "libx264") -> bytes:
    from pipeline.video_io import write_video

    buf = io.BytesIO()
    write_video(buf, video(FRAMES, seed=21), 4.0, container_format=container, codec=codec,
                **({"pix_fmt": "yuv420p"} if codec != "libvpx-vp9" else {}))
    return buf.getvalue()


def image(frame, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def messages(url: str, part: str = "video_url") -> list[dict]:
    return [{"role": "user", "content": [{"type": part, part: {"url": url}}, {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module")
def oai(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=TOKEN_A, max_retries=0, timeout=120)


def streams(server) -> set[str]:
    with client(server) as http:
        r = http.get("/v1/streams")
        assert r.status_code == 200, r.text
        return {s["stream_id"] for s in r.json()["data"]}


@pytest.mark.parametrize("mime,container,codec", [
    ("video/mp4", "mp4", "libx264"), ("video/webm", "webm", "libvpx-vp9"), ("video/x-matroska", "matroska", "libx264"),
    ("video/mp2t", "mpegts", "libx264")])
def test_a_data_url_video_file_is_a_one_shot_question(server, oai, mime, container, codec):
    before = streams(server)
    url = f"data:{mime};base64,{b64(encoded(container, codec))}"
    reply = oai.chat.completions.create(model=MODEL_NAME, messages=messages(url), max_tokens=4)
    assert reply.choices[0].message.content is not None and reply.model_extra["stream_id"] is None
    evidence = reply.model_extra["evidence"]
    assert evidence and max(e["frames"][1] for e in evidence) <= FRAMES
    streamed = list(oai.chat.completions.create(model=MODEL_NAME, messages=messages(url), max_tokens=4, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == reply.choices[0].message.content
    assert streams(server) == before  # the one-shot streams are gone


def test_vllm_jpeg_frames_and_an_image(server, oai):
    frames = video(FRAMES, seed=22)
    url = "data:video/jpeg;base64," + ",".join(b64(image(f, "JPEG")) for f in frames)
    reply = oai.chat.completions.create(model=MODEL_NAME, messages=messages(url), max_tokens=4)
    evidence = reply.model_extra["evidence"]
    assert evidence and max(e["frames"][1] for e in evidence) <= FRAMES
    assert {t for e in evidence for t in e["times"]} <= {float(t) for t in range(FRAMES)}  # one frame a second
    png = f"data:image/png;base64,{b64(image(frames[0], 'PNG'))}"
    reply = oai.chat.completions.create(model=MODEL_NAME, messages=messages(png, "image_url"), max_tokens=4)
    assert [e["frames"] for e in reply.model_extra["evidence"]] == [[0, 1]]  # a one-frame video


def test_inline_media_limits_and_one_video_per_request(server):
    def post(body):
        return httpx.post(f"{server}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {TOKEN_A}"},
                          timeout=120)

    def body(*parts, question=QUESTION):
        return {"model": MODEL_NAME, "max_tokens": 2, "messages": [{"role": "user", "content": [
            *parts, {"type": "text", "text": question}]}]}

    small = {"type": "video_url", "video_url": {"url": f"data:video/mp2t;base64,{b64(encoded('mpegts'))}"}}
    other = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(image(video(1, 3)[0], 'PNG'))}"}}
    cases = {
        "two videos": (body(small, other), 422),
        "over the inline limit": (body({"type": "video_url", "video_url": {
            "url": "data:video/mp4;base64," + "A" * (MAX_INLINE * 4 // 3 + 8)}}), 413),
        "JSON over its limit beside the media": (body(small, question="x " * MAX_JSON), 413),
        "not base64": (body({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,%%%"}}), 422),
        "not base64-encoded": (body({"type": "video_url", "video_url": {"url": "data:video/mp4,abc"}}), 422),
        "not a video type": (body({"type": "video_url", "video_url": {"url": "data:text/plain;base64,YWJj"}}), 422),
        "not a video": (body({"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{b64(b'x' * 999)}"}}), 422),
        "not an image": (body({"type": "image_url", "image_url": {"url": "data:image/png;base64,YWJj"}}), 422),
        "an image by URL": (body({"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}), 422),
    }
    for name, (request, status) in cases.items():
        r = post(request)
        assert r.status_code == status and set(r.json()["error"]) == {"type", "message"}, (name, r.text)
    assert post(body(small)).status_code == 200
    from pipeline.video_io import write_video

    buf = io.BytesIO()  # media over the JSON limit, within its own
    write_video(buf, np.random.default_rng(4).integers(0, 256, (6, 128, 128, 3), dtype=np.uint8), 4.0,
                container_format="mpegts", crf=0)
    assert MAX_JSON < len(buf.getvalue()) < MAX_INLINE
    r = post(body({"type": "video_url", "video_url": {"url": f"data:video/mp2t;base64,{b64(buf.getvalue())}"}}))
    assert r.status_code == 200, r.text
