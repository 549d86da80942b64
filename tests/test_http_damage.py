"""Damaged and awkward input over the real HTTP API (issue 21, item 7), against the session's Serve
app: a numbered upload closed with a gap, a whole non-fragmented MP4 pushed as one upload, and
one-shot questions over a damaged or cut video, which answer with a `warning`."""

import io

import numpy as np
import pytest

from pipeline.video_io import write_video
from tests.plugins.serve_app import MAX_UPLOAD, client
from tests.test_http_api import ask_body, mpegts, wait_ingested
from tests.test_live_sources import http_dir
from tests.stages import scene_video

FPS = 4.0


def noisy(frames: int, seed: int) -> np.ndarray:
    """96x96 noise: packets of several KB, so a few KB of zeros damages one or two of them."""
    return np.random.default_rng(seed).integers(0, 256, (frames, 96, 96, 3), dtype=np.uint8)


def mp4(frames: np.ndarray) -> bytes:
    """The default MP4 of PyAV and ffmpeg: its index (moov) after the media data."""
    buf = io.BytesIO()
    write_video(buf, frames, FPS, container_format="mp4", gop_size=8)
    return buf.getvalue()


def test_a_numbered_upload_closed_with_a_gap_decodes_what_arrived(server):
    data = mpegts(scene_video(32, seed=11), gop_size=4)
    quarter = len(data) // 4
    pieces = [data[:quarter], data[quarter:2 * quarter], data[2 * quarter:3 * quarter], data[3 * quarter:]]
    with client(server) as http:
        assert http.post("/v1/streams", json={"stream_id": "gappy"}).status_code == 201
        for seq in (0, 2, 3):  # chunk 1 never comes
            r = http.post("/v1/streams/gappy/chunks", params={"seq": seq}, content=pieces[seq],
                          headers={"Content-Type": "video/mp2t"})
            assert r.status_code == 202, r.text
        r = http.post("/v1/streams/gappy/close", params={"wait_s": 60})
        assert r.status_code == 200, r.text
        status = wait_ingested(http, "gappy")
        assert status["source_state"] == "finished", status
        # frames of chunks 2 and 3 arrived (chunk 0 alone holds about a quarter of the 32)
        assert 16 <= status["frames_ingested"] < 32 and status["last_time"] == pytest.approx(31 / FPS, abs=1e-3)
        assert "never arrived" in status["warning"]
        assert http.delete("/v1/streams/gappy").status_code == 200


def test_a_whole_mp4_with_its_index_at_the_end_pushed_as_one_upload(server):
    data = mp4(noisy(24, seed=12))
    assert 100_000 < len(data) <= MAX_UPLOAD and data.index(b"mdat") < data.index(b"moov")
    with client(server) as http:
        assert http.post("/v1/streams", json={"stream_id": "whole"}).status_code == 201
        r = http.post("/v1/streams/whole/chunks", content=data, headers={"Content-Type": "video/mp4"})
        assert r.status_code == 202, r.text
        assert http.post("/v1/streams/whole/close", params={"wait_s": 60}).status_code == 200
        status = wait_ingested(http, "whole", 24)
        assert (status["source_state"], status["frames_ingested"], status["warning"]) == ("finished", 24, None)
        assert http.delete("/v1/streams/whole").status_code == 200


@pytest.fixture(scope="module")
def www(tmp_path_factory):
    """Videos served over loopback HTTP (faststart MP4: index first, as served files are, since
    this server does not answer range requests): whole, damaged in the middle, and cut in half."""
    root = tmp_path_factory.mktemp("www-damage")
    write_video(root / "whole.mp4", noisy(24, seed=13), FPS, gop_size=8)  # a path: faststart
    data = (root / "whole.mp4").read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")
    mid = len(data) // 2
    (root / "damaged.mp4").write_bytes(data[:mid] + bytes(4096) + data[mid + 4096:])
    (root / "cut.mp4").write_bytes(data[:mid])
    with http_dir(root) as base:
        yield base


@pytest.mark.parametrize("name, warned", [("whole", None), ("damaged", "damaged"), ("cut", "stopped early")])
def test_one_shot_answers_over_a_partly_decoded_video_carry_a_warning(server, www, name, warned):
    body = ask_body("x")
    body["messages"][0]["content"][0]["video_url"]["url"] = f"{www}/{name}.mp4"
    with client(server) as http:
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        warning = r.json()["warning"]
        if warned is None:
            assert warning is None
        else:
            assert warned in warning, warning
