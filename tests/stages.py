"""Test helpers: driving a session stage by stage, and small scene videos."""

import numpy as np

from pipeline.segmenter import FrameFeature


def stream_updates(session, frames):
    """Stream `frames` (then flush) into `session`, yielding each update once the session applied it."""
    for i, tokens in enumerate(session.model.encode_frames(frames)):
        item = FrameFeature(tokens, (i, i + 1), (float(i), float(i)))
        closed = session.segmenter.push(item) + ([session.segmenter.flush()] if i == len(frames) - 1 else [])
        for segment in closed:
            yield session._encode_segment(segment)


def scene_video(frames: int, seed: int) -> np.ndarray:
    """Scenes of four frames each (random colours, a little noise): [frames, 32, 32, 3] uint8."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (frames // 4 + 1, 3))
    out = np.repeat(colours, 4, axis=0)[:frames, None, None, :].astype(np.int16)
    out = out + rng.integers(-3, 4, (frames, 32, 32, 3))
    return np.clip(out, 0, 255).astype(np.uint8)
