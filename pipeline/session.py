"""StreamSession: one video stream ingested frame by frame, answerable at any moment.

    frames -> visual tokens -> segmenter -> encoder (sinks + local window) -> compressor -> memory
    question -> answerer: retrieval pass per layer -> prefill [sinks | retrieved | recent] -> decode

Each stage is its own object so that actors can host them apart (actors/); this class composes
them in one process. Answering never changes the stream's memory.
"""

from __future__ import annotations

import threading
from typing import Iterator

import numpy as np

from pipeline.answerer import Answer, Answerer
from pipeline.compression import make_compressor
from pipeline.config import EngineConfig, make_config
from pipeline.encoder import SegmentEncoder
from pipeline.frames import check_frames, check_times
from pipeline.memory import SegmentUpdate, StreamMemory
from pipeline.model import VideoLLM
from pipeline.segmenter import FrameFeature, Segment, Segmenter


class StreamSession:
    def __init__(self, model: VideoLLM, method: str = "rekv", system_prompt: str | None = "You are a helpful assistant.", **options):
        self.config: EngineConfig = make_config(method, model.dims.tokens_per_frame, model.dims.frames_per_unit, **options)
        self.method = method
        self.model = model
        self._lock = threading.RLock()
        self.answerer = Answerer(model, self.config, system_prompt)
        self.encoder = SegmentEncoder(model, self.config)
        self.segmenter = Segmenter(self.config)
        self.compressor = make_compressor(model, self.config)
        self.store = StreamMemory(model.dims, self.config, self.encoder.encode_sinks(self.answerer.prefix_ids))
        self.frames_seen = 0
        self.last_time: float | None = None
        # frames short of a whole unit (Qwen-VL's temporal patch: 2 frames), with index and time
        self._pending: list[tuple[np.ndarray, int, float]] = []

    # ---- ingest -----------------------------------------------------------------------------
    def add_frames(self, frames, timestamps=None) -> int:
        """Ingest uint8 frames [T, H, W, 3] (times in seconds, increasing); returns frames seen."""
        frames = check_frames(frames)
        with self._lock:
            times = check_times(timestamps, len(frames), self.frames_seen, self.last_time, self.config.frame_rate)
            frames = self.model.prepare_frames(frames)
            pending = self._pending + [(frame, self.frames_seen + i, times[i]) for i, frame in enumerate(frames)]
            whole = len(pending) // self.model.dims.frames_per_unit * self.model.dims.frames_per_unit
            self._encode_units(pending[:whole])
            self._pending = pending[whole:]  # a temporal patch waits for its second frame
            self.frames_seen += len(frames)
            self.last_time = times[-1]
            return self.frames_seen

    def _encode_units(self, frames: list[tuple[np.ndarray, int, float]]) -> None:
        """Encode frames (with index and time) unit by unit into the segmenter; a last partial unit
        is padded by the model's processor (repeating its last frame)."""
        if not frames:
            return
        per_unit = self.model.dims.frames_per_unit
        # [U, n, hidden], and Qwen3-VL's deepstack features [U, k, n, hidden]
        features, deepstack = self.model.encode_units(np.stack([f for f, _, _ in frames]), self.config.vision_batch)
        for i, tokens in enumerate(features):
            unit = frames[i * per_unit : (i + 1) * per_unit]
            item = FrameFeature(tokens=tokens, frames=(unit[0][1], unit[-1][1] + 1), times=(unit[0][2], unit[-1][2]),
                                deepstack=None if deepstack is None else deepstack[i])
            for segment in self.segmenter.push(item):
                self._encode_segment(segment)

    def _encode_segment(self, segment: Segment) -> SegmentUpdate:
        update = self.encoder.encode(self.store, segment)
        self.compressor.decide(update)
        self.store.apply(update)
        self.compressor.compact(self.store, update)
        return update

    def flush(self) -> None:
        """Encode the open partial segment now (done before every question), with a lone last frame
        as a unit of its own, padded the way the processor pads a video (chosen: the next frame
        then starts a new temporal patch)."""
        with self._lock:
            self._encode_units(self._pending)
            self._pending = []
            segment = self.segmenter.flush()
            if segment is not None:
                self._encode_segment(segment)

    # ---- questions --------------------------------------------------------------------------
    def ask(self, question: str, max_new_tokens: int = 64) -> Answer:
        with self._lock:
            self.answerer.check(question, max_new_tokens)
            self.flush()
            return self.answerer.ask(self.store, question, max_new_tokens)

    def ask_stream(self, question: str, max_new_tokens: int = 64) -> Iterator[str]:
        """Yield the answer text piece by piece as tokens are generated."""
        with self._lock:
            self.answerer.check(question, max_new_tokens)
            self.flush()
            generation = self.answerer.generation(self.store, question, max_new_tokens)
        yield from generation.text_pieces()

    def memory(self) -> dict[str, int]:
        """Exact bytes of retained KV, by tier (sinks, blocks, long_term, window, index, features, total)."""
        with self._lock:
            return self.store.memory()
