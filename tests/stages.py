"""Driving a session stage by stage, as the actors do, to see every SegmentUpdate."""

from pipeline.segmenter import FrameFeature


def stream_updates(session, frames):
    """Stream `frames` (then flush) into `session`, yielding each update once the session applied it."""
    for i, tokens in enumerate(session.model.encode_frames(frames)):
        item = FrameFeature(tokens, (i, i + 1), (float(i), float(i)))
        closed = session.segmenter.push(item) + ([session.segmenter.flush()] if i == len(frames) - 1 else [])
        for segment in closed:
            yield session._encode_segment(segment)
