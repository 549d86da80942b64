"""Checks on frames and timestamps entering a stream. numpy only, no torch: the Ray coordinator
uses them, and decoder actors that hold a handle to it import its module."""

from __future__ import annotations

import numpy as np

from pipeline.errors import InvalidInputError


def check_frames(frames) -> np.ndarray:
    if hasattr(frames, "detach"):  # a torch tensor (torch is not imported here)
        frames = frames.detach().cpu().numpy()
    if not isinstance(frames, np.ndarray):
        raise InvalidInputError(f"frames must be a numpy array [T, H, W, 3] of uint8, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise InvalidInputError(f"frames must be uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or min(frames.shape) == 0:
        raise InvalidInputError(f"frames must have shape [T, H, W, 3] with T, H, W >= 1, got {list(frames.shape)}")
    return frames


def check_times(timestamps, count: int, frames_seen: int, last_time: float | None, frame_rate: float) -> list[float]:
    """Timestamps for `count` new frames: given (finite, increasing, after `last_time`) or index / rate."""
    if timestamps is None:
        return [(frames_seen + i) / frame_rate for i in range(count)]
    times = np.asarray(timestamps, dtype=np.float64).reshape(-1)
    if times.shape[0] != count:
        raise InvalidInputError(f"{count} frames but {times.shape[0]} timestamps")
    if not np.all(np.isfinite(times)) or np.any(np.diff(times) <= 0):
        raise InvalidInputError("timestamps must be finite and strictly increasing")
    if last_time is not None and times[0] <= last_time:
        raise InvalidInputError(f"timestamps must continue after {last_time}")
    return times.tolist()
