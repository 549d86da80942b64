"""Segmentation: which consecutive frames are encoded together as one segment.

Uniform segments have a fixed number of frames. Semantic segments (StreamKV) follow the content:
a frame joins the open segment while the segment is shorter than `min_frames` or the frame is
nearly the same as the previous one (cosine of their mean visual tokens above `threshold`).
A segment never holds more than `max_frames` blocks: past that, the two most similar adjacent
frames are merged into one (token-wise mean).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pipeline.config import EngineConfig


@dataclass
class FrameFeature:
    """Visual tokens of one frame, or of several merged frames."""

    tokens: torch.Tensor  # [n, hidden]
    frames: tuple[int, int]  # frame indices [first, last + 1)
    times: tuple[float, float]  # seconds, first and last frame
    deepstack: torch.Tensor | None = None  # Qwen3-VL: [k, n, hidden] features for the first k LM layers

    def unit(self) -> tuple[torch.Tensor, tuple[float, float], torch.Tensor | None]:
        """As VideoLLM.unit_inputs takes it."""
        return self.tokens, self.times, self.deepstack

    @property
    def vector(self) -> torch.Tensor:
        return self.tokens.float().mean(dim=0)


@dataclass
class Segment:
    index: int
    items: list[FrameFeature] = field(default_factory=list)

    @property
    def frames(self) -> tuple[int, int]:
        return self.items[0].frames[0], self.items[-1].frames[1]

    @property
    def times(self) -> tuple[float, float]:
        return self.items[0].times[0], self.items[-1].times[1]


class Segmenter:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.open: Segment | None = None
        self.closed = 0

    def push(self, item: FrameFeature) -> list[Segment]:
        """Add one frame; return the segments this closes (zero or one)."""
        done = []
        if self.open is not None and self._closes_before(item):
            done.append(self.flush())
        if self.open is None:
            self.open = Segment(index=self.closed)
        self.open.items.append(item)
        if self.config.segmentation == "uniform" and len(self.open.items) >= self.config.segment_frames:
            done.append(self.flush())
        elif self.config.segmentation == "semantic" and len(self.open.items) > self.config.max_frames:
            _merge_most_similar(self.open.items)
        return [s for s in done if s is not None]

    def flush(self) -> Segment | None:
        """Close the open segment (e.g. when a question arrives); None if there is none."""
        segment, self.open = self.open, None
        if segment is not None:
            self.closed += 1
        return segment

    def _closes_before(self, item: FrameFeature) -> bool:
        if self.config.segmentation != "semantic" or len(self.open.items) < self.config.min_frames:
            return False
        similarity = F.cosine_similarity(self.open.items[-1].vector, item.vector, dim=0)
        return bool(similarity <= self.config.threshold)


def _merge_most_similar(items: list[FrameFeature]) -> None:
    vectors = F.normalize(torch.stack([item.vector for item in items]), dim=1)
    adjacent = (vectors[:-1] * vectors[1:]).sum(dim=1)  # [len - 1]
    i = int(adjacent.argmax())
    left, right = items[i], items[i + 1]
    items[i : i + 2] = [
        FrameFeature(
            tokens=(left.tokens + right.tokens) / 2,
            frames=(left.frames[0], right.frames[1]),
            times=(left.times[0], right.times[1]),
            deepstack=None if left.deepstack is None else (left.deepstack + right.deepstack) / 2,
        )
    ]
