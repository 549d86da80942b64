"""StreamSession: one video stream ingested frame by frame, answerable at any moment.

    frames -> visual tokens -> segmenter -> encode segment (sinks + local window) -> compressor
    question -> retrieval pass per layer -> prefill [sinks | retrieved | recent] -> greedy decode

Answering never changes the stream's memory.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from pipeline.attention import AnswerPlan, ContextPlan
from pipeline.compression import make_compressor
from pipeline.config import EngineConfig, make_config
from pipeline.errors import InvalidInputError, NoFramesError, UnsupportedModelError
from pipeline.kv_store import KV
from pipeline.memory import StreamMemory
from pipeline.model import VideoLLM
from pipeline.retrieval import LayerView, Selection
from pipeline.segmenter import FrameFeature, Segment, Segmenter

MAX_NEW_TOKENS = 4096


@dataclass(frozen=True)
class Evidence:
    """A stretch of the stream the answer attended to."""

    frames: tuple[int, int]  # [first, last + 1)
    times: tuple[float, float]  # seconds
    score: float  # mean retrieval score over the layers that chose it (0.0 when nothing was scored)
    layers: int  # how many layers chose it


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    evidence: list[Evidence]
    first_token_logits: torch.Tensor = field(repr=False)  # [vocab] fp32


class StreamSession:
    def __init__(self, model: VideoLLM, method: str = "rekv", system_prompt: str | None = "You are a helpful assistant.", **options):
        self.config: EngineConfig = make_config(method, **options)
        self.method = method
        self.model = model
        self.system_prompt = system_prompt
        self._lock = threading.RLock()
        self._prefix_ids = model.prompt_parts(system_prompt, "").prefix_ids
        self.segmenter = Segmenter(self.config)
        self.compressor = make_compressor(model, self.config)
        self.store = StreamMemory(model.dims, self.config, self._encode_sinks())
        self.frames_seen = 0
        self.last_time: float | None = None

    # ---- ingest -----------------------------------------------------------------------------
    def add_frames(self, frames, timestamps=None) -> int:
        """Ingest uint8 frames [T, H, W, 3] (times in seconds, increasing); returns frames seen."""
        frames = _check_frames(frames)
        with self._lock:
            times = self._check_times(timestamps, len(frames))
            features = self.model.encode_frames(frames, self.config.vision_batch)  # [T, n, hidden]
            for i, tokens in enumerate(features):
                index = self.frames_seen + i
                item = FrameFeature(tokens=tokens, frames=(index, index + 1), times=(times[i], times[i]))
                for segment in self.segmenter.push(item):
                    self._encode_segment(segment)
            self.frames_seen += len(frames)
            self.last_time = times[-1]
            return self.frames_seen

    def _encode_sinks(self) -> list[KV]:
        def nothing(layer, _query_mean):
            empty = torch.empty(self.model.dims.kv_heads, 0, self.model.dims.head_dim, device=self.model.device, dtype=self.model.dtype)
            return empty, empty

        plan = ContextPlan(self.model.rotate, nothing)
        self.model.forward(self.model.embed(self._prefix_ids), plan)
        return [(plan.keys[layer], plan.values[layer]) for layer in range(self.model.dims.layers)]

    def _encode_segment(self, segment: Segment) -> None:
        """Encode a closed segment on top of [sinks | window], then hand it to the compressor."""
        memory, n = self.store, self.model.dims.tokens_per_frame
        if self.config.retrieval == "uniform":  # the baseline encodes only at question time
            memory.features.extend(segment.items)
            return
        items = [("frame", item.tokens, item.frames, item.times) for item in segment.items]
        if self.config.summaries:  # StreamKV's pseudo-frame: the token-wise mean of the segment
            mean = torch.stack([item.tokens for item in segment.items]).mean(dim=0)
            items.append(("summary", mean, segment.frames, segment.times))
        keep_queries = self.config.vsb_queries if self.config.compression == "vsb" else 0
        plan = ContextPlan(self.model.rotate, lambda layer, _q: memory.ingest_context(layer), keep_queries)
        self.model.forward(torch.cat([tokens for _, tokens, _, _ in items]), plan)
        memory.recent_queries = plan.last_queries
        units, kv = [], []
        for i, (kind, _, frames, times) in enumerate(items):
            units.append(memory.new_unit(kind, frames, times, segment.index, n))
            # clone: each block owns its storage, so dropping it frees exactly its bytes
            kv.append([(plan.keys[l][:, i * n : (i + 1) * n].clone(), plan.values[l][:, i * n : (i + 1) * n].clone())
                       for l in range(self.model.dims.layers)])
        self.compressor.add_segment(memory, units, kv)
        evicted = [old for unit, unit_kv in zip(units, kv) for old in memory.window.push(unit.uid, unit_kv)]
        self.compressor.on_evicted(memory, evicted)

    def flush(self) -> None:
        """Encode the open partial segment now (done before every question)."""
        with self._lock:
            segment = self.segmenter.flush()
            if segment is not None:
                self._encode_segment(segment)

    # ---- questions --------------------------------------------------------------------------
    def ask(self, question: str, max_new_tokens: int = 64) -> Answer:
        generation = _Generation(self, question, max_new_tokens)
        token_ids = list(generation)
        return Answer(self.model.decode(token_ids), token_ids, generation.evidence, generation.first_token_logits)

    def ask_stream(self, question: str, max_new_tokens: int = 64) -> Iterator[str]:
        """Yield the answer text piece by piece as tokens are generated."""
        token_ids, emitted = [], ""
        for token in _Generation(self, question, max_new_tokens):
            token_ids.append(token)
            text = self.model.decode(token_ids)
            if len(text) > len(emitted):
                yield text[len(emitted) :]
                emitted = text

    def memory(self) -> dict[str, int]:
        """Exact bytes of retained KV, by tier (sinks, blocks, long_term, window, index, total)."""
        with self._lock:
            return self.store.memory()

    def _question_ids(self, question: str) -> tuple[list[int], list[int]]:
        if not isinstance(question, str) or not question.strip():
            raise InvalidInputError("the question must be a non-empty string")
        bare = self.model.tokenize(question)
        if len(bare) > self.config.max_question_tokens:
            raise InvalidInputError(f"the question has {len(bare)} tokens; the limit is {self.config.max_question_tokens}")
        parts = self.model.prompt_parts(self.system_prompt, question)
        if parts.prefix_ids != self._prefix_ids:
            raise UnsupportedModelError("the chat template puts question text before the video")
        return bare, parts.suffix_ids

    def _select(self, question_ids: list[int]) -> Selection:
        """The retrieval pass: the bare question, layer by layer, each layer choosing its blocks."""
        if self.config.retrieval == "uniform":
            return self._uniform_selection()
        sinks = self.store.sinks
        selection = Selection(self.config, [self.store.layer_view(l) for l in range(self.model.dims.layers)])
        if self.config.retrieval != "none":

            def retrieved(layer, query_mean):
                selection.choose_layer(layer, query_mean)
                return selection.context(layer, sinks[layer])

            self.model.forward(self.model.embed(question_ids), ContextPlan(self.model.rotate, retrieved))
            selection.finalize()
        return selection

    def _uniform_selection(self) -> Selection:
        """The base model on top_k frames sampled uniformly from the stream, encoded afresh."""
        items = self.store.features
        picks = sorted(set(np.linspace(0, len(items) - 1, min(self.config.top_k, len(items))).round().astype(int).tolist()))
        plan = ContextPlan(self.model.rotate, lambda layer, _q: self.store.sinks[layer])
        self.model.forward(torch.cat([items[i].tokens for i in picks]), plan)
        n, spans = self.model.dims.tokens_per_frame, [(items[i].frames, items[i].times) for i in picks]

        def view(layer: int) -> LayerView:
            def gather(indices):
                rows = torch.cat([torch.arange(i * n, (i + 1) * n) for i in indices]).to(self.model.device)
                return plan.keys[layer].index_select(1, rows), plan.values[layer].index_select(1, rows)

            return LayerView(reps=torch.empty(0), gather=gather, spans=spans)

        return Selection(self.config, [view(layer) for layer in range(self.model.dims.layers)])

    def _check_times(self, timestamps, count: int) -> list[float]:
        if timestamps is None:
            return [(self.frames_seen + i) / self.config.frame_rate for i in range(count)]
        times = np.asarray(timestamps, dtype=np.float64).reshape(-1)
        if times.shape[0] != count:
            raise InvalidInputError(f"{count} frames but {times.shape[0]} timestamps")
        if not np.all(np.isfinite(times)) or np.any(np.diff(times) <= 0):
            raise InvalidInputError("timestamps must be finite and strictly increasing")
        if self.last_time is not None and times[0] <= self.last_time:
            raise InvalidInputError(f"timestamps must continue after {self.last_time}")
        return times.tolist()


class _Generation:
    """One answer: validation, flush, retrieval, prefill, then greedy tokens as an iterator."""

    def __init__(self, session: StreamSession, question: str, max_new_tokens: int):
        if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise InvalidInputError(f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS}]")
        self.session = session
        self.model = session.model
        self.max_new_tokens = max_new_tokens
        with session._lock:
            bare_ids, self.suffix_ids = session._question_ids(question)
            session.flush()
            if session.frames_seen == 0:
                raise NoFramesError("no frames have been ingested in this stream yet")
            selection = session._select(bare_ids)
            self.evidence = _evidence(selection)
            contexts = [selection.context(l, session.store.sinks[l]) for l in range(self.model.dims.layers)]
        self.plan = AnswerPlan(self.model.rotate, contexts, capacity=len(self.suffix_ids) + 1 + max_new_tokens)
        self.first_token_logits: torch.Tensor | None = None

    def __iter__(self) -> Iterator[int]:
        embeds = torch.cat([self.model.newline_embedding, self.model.embed(self.suffix_ids)])
        for step in range(self.max_new_tokens):
            logits = self.model.logits(self.model.forward(embeds, self.plan)[-1])
            if step == 0:
                self.first_token_logits = logits
            token = int(logits.argmax())
            yield token
            if token in self.model.eos_ids:
                return
            embeds = self.model.embed([token])


def _evidence(selection: Selection) -> list[Evidence]:
    found: dict[tuple[int, int], list] = {}  # frames -> [times, score sum, layers]
    for layer, chosen in enumerate(selection.chosen):
        view, scores = selection.views[layer], selection.scores[layer]
        for i in chosen:
            frames, times = view.spans[i]
            entry = found.setdefault(frames, [times, 0.0, 0])
            entry[1] += float(scores[i]) if scores is not None else 0.0
            entry[2] += 1
    return [Evidence(frames, times, total / layers, layers) for frames, (times, total, layers) in sorted(found.items())]


def _check_frames(frames) -> np.ndarray:
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    if not isinstance(frames, np.ndarray):
        raise InvalidInputError(f"frames must be a numpy array [T, H, W, 3] of uint8, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise InvalidInputError(f"frames must be uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or min(frames.shape) == 0:
        raise InvalidInputError(f"frames must have shape [T, H, W, 3] with T, H, W >= 1, got {list(frames.shape)}")
    return frames
