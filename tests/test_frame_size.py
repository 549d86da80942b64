"""Frames sized for the model at the decoder (issue 23 item 3), with real Ray and PyAV.

A 1920x1080 clip attached as a source reaches the coordinator in chunks of the model's input size
(the prefill actor says it once), and the stream answers exactly as one fed the same clip decoded
at that size beforehand; the processor sees nearly the pixels it would have made from full frames.
A caller's own size, and sources already no larger than the model's, are left as they are.
"""

import time

import numpy as np
import pytest
import ray

from actors.coordinator import StreamCoordinator
from pipeline.decode import DecodeConfig, open_source

FRAMES = 8
QUESTION = "what colour is the frame?"


def full_hd_video(frames: int) -> np.ndarray:
    """Scenes of four frames, each a colour gradient with fine stripes (detail that resizing must
    average away): [frames, 1080, 1920, 3] uint8."""
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:1080, 0:1920]
    out = []
    for i in range(frames):
        base = rng.integers(0, 200, 3) if i % 4 == 0 else base
        stripes = ((x // 3 + y // 5) % 2 * 40)[..., None]
        ramp = (x * 40 // 1920)[..., None]
        out.append(np.clip(base + stripes + ramp, 0, 255).astype(np.uint8))
    return np.stack(out)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from pipeline.video_io import write_video

    path = tmp_path_factory.mktemp("clips") / "full-hd.mp4"
    write_video(path, full_hd_video(FRAMES), fps=2.0)
    return str(path)


@pytest.fixture(scope="module")
def coordinator(ray_runtime, checkpoint_dirs):
    handle = ray.remote(StreamCoordinator).options(num_cpus=0.05).remote(checkpoint_dirs["gqa"], actor_cpus=0.05)
    yield handle
    ray.get(handle.shutdown.remote())
    ray.kill(handle)


def finished(coordinator, stream_id: str) -> dict:
    deadline = time.monotonic() + 120
    while (status := ray.get(coordinator.status.remote(stream_id)))["source_state"] not in ("finished", "failed"):
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    return status


def decoder_shape(coordinator, stream_id: str) -> list[int]:
    decoder = ray.get(coordinator.workers.remote())["decoders"][stream_id]
    return ray.get(decoder.status.remote())["frame_shape"]


def test_a_full_hd_source_reaches_the_model_at_its_size_with_the_same_answer(coordinator, clip, checkpoint_dirs):
    from pipeline.model import load_model

    side = load_model(checkpoint_dirs["gqa"]).frame_size
    ray.get(coordinator.create_stream.remote("full-hd"))
    ray.get(coordinator.attach_source.remote("full-hd", clip))
    status = finished(coordinator, "full-hd")
    assert status["source_state"] == "finished" and status["frames_ingested"] == FRAMES, status
    assert decoder_shape(coordinator, "full-hd") == [side, side]  # not 1080 x 1920

    # the same clip decoded at the model's size beforehand, ingested directly
    with open_source(clip, DecodeConfig(size=(side, side))) as source:
        decoded = list(source)
    frames = np.stack([f.image for f in decoded])
    assert frames.shape == (FRAMES, side, side, 3)
    ray.get(coordinator.create_stream.remote("pre-sized"))
    ray.get(coordinator.ingest.remote("pre-sized", frames, [f.time for f in decoded]))

    answers = [ray.get(coordinator.ask.remote(sid, QUESTION, 4)) for sid in ("full-hd", "pre-sized")]
    assert answers[0]["token_ids"] == answers[1]["token_ids"]
    assert [e["frames"] for e in answers[0]["evidence"]] == [e["frames"] for e in answers[1]["evidence"]]
    for sid in ("full-hd", "pre-sized"):
        ray.get(coordinator.delete_stream.remote(sid))


def test_resizing_at_the_decoder_is_close_to_the_processor_resizing_full_frames(clip, checkpoint_dirs):
    """Resizing twice (decoder: area, processor: its own) vs once (processor on full frames): the
    pixel values the vision tower reads differ little (BENCHMARKS.md has the figures)."""
    from pipeline.model import load_model

    model = load_model(checkpoint_dirs["gqa"])
    side = model.frame_size
    with open_source(clip, DecodeConfig()) as source:
        full = np.stack([f.image for f in source])
    with open_source(clip, DecodeConfig(size=(side, side))) as source:
        small = np.stack([f.image for f in source])
    once, twice = (model.processor.video_processor(videos=[v], return_tensors="pt")["pixel_values_videos"].numpy()
                   for v in (full, small))
    assert once.shape == twice.shape
    # normalized values span about 4 units (mean/std normalization); frame-wide stripes and ramps
    # are averaged alike, so the two differ by a few hundredths on average
    assert np.abs(once - twice).mean() < 0.05, np.abs(once - twice).mean()


def test_a_callers_size_and_small_sources_are_kept(coordinator, tmp_path, checkpoint_dirs):
    from pipeline.video_io import write_video
    from tests.stages import scene_video

    small = tmp_path / "small.mp4"
    write_video(small, scene_video(8, seed=4)[:, :16, :24], fps=2.0)  # 16 x 24: below the model's size
    for sid, decode, shape in [("small", None, [16, 24]), ("caller", DecodeConfig(size=(20, 20)), [20, 20])]:
        ray.get(coordinator.create_stream.remote(sid))
        ray.get(coordinator.attach_source.remote(sid, str(small), decode))
        assert finished(coordinator, sid)["frames_ingested"] == 8
        assert decoder_shape(coordinator, sid) == shape
        ray.get(coordinator.delete_stream.remote(sid))
