"""The multi-camera ingestion job: four mp4 cameras served over loopback HTTP, ingested at once."""

import functools
import http.server
import threading

import numpy as np
import pytest
import ray
import yaml

from deploy.ingest import read_sources, run_ingest
from pipeline import ConfigError
from pipeline.video_io import write_video


@pytest.fixture(scope="module")
def cameras(tmp_path_factory):
    """Four different clips behind a real HTTP server on 127.0.0.1."""
    root = tmp_path_factory.mktemp("cameras")
    rng = np.random.default_rng(0)
    for i in range(4):
        colours = rng.integers(0, 256, (6, 3))
        frames = np.repeat(colours, 4 + i, axis=0)[:, None, None, :].repeat(32, 1).repeat(32, 2).astype(np.uint8)
        write_video(root / f"cam{i}.mp4", frames, fps=1.0)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {f"cam{i}": (f"http://127.0.0.1:{server.server_port}/cam{i}.mp4", 6 * (4 + i)) for i in range(4)}
    server.shutdown()


def test_four_http_cameras_are_ingested_by_one_job_then_questioned(ray_runtime, checkpoint_dirs, cameras, tmp_path):
    from actors.coordinator import StreamCoordinator

    spec = {"model": checkpoint_dirs["gqa"], "defaults": {"method": "rekv", "fps": None, "policy": "block",
                                                          "options": {"top_k": 4}},
            "sources": [{"id": cid, "url": url} for cid, (url, _) in cameras.items()]}
    (tmp_path / "sources.yaml").write_text(yaml.safe_dump(spec))
    model_dir, sources = read_sources(tmp_path / "sources.yaml")
    handle = ray.remote(StreamCoordinator).options(num_cpus=0.1).remote(model_dir)
    statuses = run_ingest(handle, sources)
    for cid, (_, frames) in cameras.items():
        assert statuses[cid]["source_state"] == "finished"
        assert statuses[cid]["frames_ingested"] == frames and statuses[cid]["frames_dropped"] == 0
    answers = ray.get([handle.ask.remote(cid, "what color was the star?", 3) for cid in cameras])
    for (cid, (_, frames)), answer in zip(cameras.items(), answers):
        assert answer["evidence"] and all(e["frames"][1] <= frames for e in answer["evidence"])
    # the job run again (after a crash, say) watches the streams it finds, and reads no file twice
    again = run_ingest(handle, sources)
    assert {cid: s["frames_ingested"] for cid, s in again.items()} == {cid: n for cid, (_, n) in cameras.items()}
    ray.kill(handle)


def test_a_bad_sources_file_is_a_config_error(tmp_path):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"sources": [{"id": "a", "url": "x", "colour": "red"}]}))
    with pytest.raises(ConfigError):
        read_sources(tmp_path / "bad.yaml")
    (tmp_path / "dup.yaml").write_text(yaml.safe_dump({"sources": [{"id": "a", "url": "x"}, {"id": "a", "url": "y"}]}))
    with pytest.raises(ConfigError):
        read_sources(tmp_path / "dup.yaml")
