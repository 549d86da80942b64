"""What every actor needs to know about a stream to host its piece of it."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import EngineConfig, make_config
from pipeline.errors import StreamKVError, UnknownStreamError


@dataclass(frozen=True)
class StreamSpec:
    stream_id: str
    method: str = "rekv"
    options: dict = field(default_factory=dict)
    system_prompt: str | None = "You are a helpful assistant."

    def config(self) -> EngineConfig:
        return make_config(self.method, **self.options)


def lookup(table: dict, stream_id: str):
    """A stream's state in an actor, or the typed error that tells the coordinator to restore it."""
    try:
        return table[stream_id]
    except KeyError:
        raise UnknownStreamError(f"stream {stream_id!r} is not open here") from None


class ReplicaGapError(StreamKVError, RuntimeError):
    """An update arrived out of order: the replica must be restored from a snapshot."""
