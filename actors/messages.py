"""Typed messages that cross actor boundaries, and the one definition of a source's states.

Plain dataclasses of plain values (and object refs): the coordinator imports this module, and it
must stay free of torch and transformers (every decoder actor imports the coordinator's modules).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from actors.spec import StreamSpec


class SourceState(str, Enum):
    """A stream source's (decoder's) state: starting (created, or opening / waiting for pushed
    bytes), running, then one of the terminal ones."""

    STARTING = "starting"
    RUNNING = "running"
    FINISHED = "finished"  # the source ended (end of file, upload closed)
    FAILED = "failed"  # an error ended it: last_error says which
    STOPPED = "stopped"  # stopped by the coordinator (stream deleted, source replaced)

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({SourceState.FINISHED, SourceState.FAILED, SourceState.STOPPED})


def is_terminal(state: str | None) -> bool:
    """Whether a state as statuses carry it (a plain string, or None: no source) has ended."""
    return state is not None and SourceState(state).terminal


@dataclass(frozen=True)
class PushReceipt:
    """What a push of video bytes answers (a decoder's `push`, the coordinator's): the bytes its
    decoder still buffers and the source's state, so that an uploader learns both in one call."""

    buffered_bytes: int
    state: SourceState


@dataclass
class SourceNote:
    """What a restarted coordinator needs of a stream's source (kept in the compressor actor)."""

    decoder: str | None = None  # the decoder actor's name (a named coordinator's outlive it)
    mode: str | None = None  # "push" or "pull"
    attached_at: int = 0  # frames the stream had ingested when the source was attached
    retired: dict[str, int] = field(default_factory=lambda: {"decoded": 0, "dropped": 0})  # earlier sources'
    # attach_source's arguments, when a new decoder may take the source up again (a live pull,
    # an open upload); None when reading it again would repeat frames (a file)
    resumable: tuple | None = None


@dataclass
class LoneFrames:
    """Frames short of a whole unit (Qwen-VL's temporal patch of 2 frames): they wait, as pixels,
    for the frame that completes their unit; a question encodes them as a unit of their own,
    padded the way the processor pads a video."""

    pixels: np.ndarray  # [k, S, S, 3] uint8, k < frames per unit
    times: list[float]
    first: int  # the first one's frame number


@dataclass
class SegmenterState:
    """How far a stream has got in the segmenter: what a compressor actor hosting it again starts from."""

    frames: int = 0  # frames pushed so far
    last_time: float | None = None  # of the last frame pushed
    segments: int = 0  # segments closed so far
    source: SourceNote | None = None
    lone: LoneFrames | None = None  # frames (counted above) waiting for the rest of their unit


@dataclass
class HeldSegments(SegmenterState):
    """A stream as the compressor actor holds it, for a restarted coordinator."""

    # the open segment's frames: pack_features' meta ((frame range, time range) per frame) and
    # their visual tokens [T, n, hidden] (with deepstack: [T, 1 + k, n, hidden], cache_store/wire.py)
    # (plain values: the coordinator does not import the formats)
    open_ranges: list = field(default_factory=list)
    open_tokens: np.ndarray | None = None
    closed: list[Any] = field(default_factory=list)  # closed segments not known to be committed (refs)


@dataclass
class HeldReplica:
    """A stream as the prefill actor holds it, for a restarted coordinator."""

    spec: StreamSpec
    applied: int  # updates committed
    unpublished: list[Any]  # refs to the last committed updates not known to have reached every replica
