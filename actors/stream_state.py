"""The coordinator's record of a stream, and of a chunk of its frames on their way in."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors.calls import Coalescer
from actors.messages import LoneFrames, SourceNote
from actors.spec import StreamSpec


def pending_entries(ranges: list, tokens: np.ndarray | None) -> list:
    """Frames with their (frame, time) ranges (pack_features' meta) as StreamState.pending entries."""
    return [((f[0], f[1]), tokens[i], (t[0], t[1])) for i, (f, t) in enumerate(ranges)]



@dataclass
class Chunk:
    tokens: np.ndarray | None  # [T, n, hidden] visual tokens of the chunk's frames (one frame a unit)
    times: Any  # as the caller gave them (checked when the chunk's turn comes)
    ingested: asyncio.Future  # the stream's frame count, once the chunk's segments are committed
    may_repeat: bool = False  # sent again by a decoder after a restart: frames up to last_time are skipped
    pixels: np.ndarray | None = None  # [T, S, S, 3] the frames, where units take several (encoded in stream order)


def done_future() -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


def settle(future: asyncio.Future, result, source: asyncio.Future) -> None:
    """Finish `future` like `source`: its exception, else `result`."""
    if not future.done():
        error = source.exception()
        future.set_exception(error) if error else future.set_result(result)


@dataclass
class StreamState:
    """A stream as the coordinator orders its work; the model actors hold its memory."""

    spec: StreamSpec
    frame_rate: float
    frames_per_unit: int = 1  # frames one unit of visual tokens encodes (Qwen-VL's temporal patch: 2)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    chunk_turn: asyncio.Condition = field(default_factory=asyncio.Condition)  # decoder chunks in seq order
    next_chunk: int = 0
    frames_seen: int = 0
    segments: int = 0  # closed by the segmenter (the next one's number)
    last_time: float | None = None
    applied: int = 0  # updates committed to every replica
    published: int = 0  # of them, how many are known to have reached every replica and the index
    # the open segment's units: (frame range, visual tokens [n, hidden], time range) each (with
    # deepstack, Qwen3-VL: visual tokens and deepstack features [1 + k, n, hidden], as encode_frames gives them)
    pending: list[tuple[tuple[int, int], np.ndarray, tuple[float, float]]] = field(default_factory=list)
    lone: LoneFrames | None = None  # frames ingested that wait for the rest of their unit
    recoveries: int = 0
    last_error: str | None = None
    deleted: bool = False  # set when deletion starts: no work for it may reach the actors after that
    # None once deleted (_current guards their use)
    chunks: Coalescer | None = field(init=False)  # encoded chunks on their way to the segmenter (_segment_batch)
    commits: Coalescer | None = field(init=False)  # closed segments on their way to the replicas (_commit_batch)
    committing: asyncio.Future | None = None  # done when the last queued segments are committed
    # chunks segmented, compressor pushes and commits they took: how much queued-up work coalesced
    batching: dict[str, int] = field(default_factory=lambda: {"chunks": 0, "pushes": 0, "commits": 0})
    publishing: list[asyncio.Task] = field(default_factory=list)  # updates on their way to replicas
    # committed updates not sent to the replicas and the index yet (ingest.py _publish), with the
    # timer that sends them
    unsent: list[tuple[Any, Any]] = field(default_factory=list)
    send_timer: asyncio.TimerHandle | None = None
    lost: str | None = None  # why the stream's memory has a gap (a failed commit, no replica left)
    decoder: Any = None  # the DecoderActor reading the source
    # the source as a restarted coordinator takes it up (kept in the compressor actor too): mode,
    # the decoder's name, earlier sources' counts, attach_source's arguments to attach it again
    source: SourceNote = field(default_factory=SourceNote)
    resent_below: int = 0  # decoder chunks numbered below this may repeat frames (resync)
    adopted: bool = False  # taken over by a restarted coordinator
    resumed: bool = False  # its adopted decoder resumed (resume_sources)

