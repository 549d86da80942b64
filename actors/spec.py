"""What every actor needs to know about a stream to host its piece of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.config import PAPER_TOKENS_PER_FRAME, EngineConfig, make_config
from pipeline.errors import StreamKVError, UnknownStreamError

if TYPE_CHECKING:
    from pipeline.model import ModelDims


@dataclass(frozen=True)
class StreamSpec:
    stream_id: str
    method: str = "rekv"
    options: dict = field(default_factory=dict)
    system_prompt: str | None = "You are a helpful assistant."

    def config(self, dims: ModelDims | None = None) -> EngineConfig:
        """The stream's config for a model of shape `dims` (presets are scaled to its tokens per
        frame and frames per unit; the coordinator, which holds no model, reads only knobs that do
        not depend on them)."""
        if dims is None:
            return make_config(self.method, PAPER_TOKENS_PER_FRAME, **self.options)
        return make_config(self.method, dims.tokens_per_frame, dims.frames_per_unit, **self.options)


def lookup(table: dict, stream_id: str):
    """A stream's state in an actor, or the typed error that tells the coordinator to restore it."""
    try:
        return table[stream_id]
    except KeyError:
        raise UnknownStreamError(f"stream {stream_id!r} is not open here") from None


class ReplicaGapError(StreamKVError, RuntimeError):
    """An update arrived out of order: the replica must be restored from a snapshot."""
