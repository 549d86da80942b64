"""Answering over a stream's memory: retrieval pass per layer on the bare question, prefill of the
templated prompt on [sinks | retrieved | recent], greedy decoding. It reads the memory, never
changes it, so any replica of a stream's memory can answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from pipeline.attention import AnswerPlan, ContextPlan
from pipeline.config import EngineConfig
from pipeline.errors import InvalidInputError, NoFramesError, UnsupportedModelError
from pipeline.kv_store import Visual
from pipeline.memory import StreamMemory
from pipeline.model import VideoLLM
from pipeline.positions import Rope
from pipeline.retrieval import LayerView, Selection

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
    prompt_tokens: int  # positions the first answer token attended to (see Generation)
    first_token_logits: torch.Tensor = field(repr=False)  # [vocab] fp32


class Answerer:
    def __init__(self, model: VideoLLM, config: EngineConfig, system_prompt: str | None):
        self.model = model
        self.config = config
        self.system_prompt = system_prompt
        self.prefix_ids = model.prompt_parts(system_prompt, "").prefix_ids  # the stream's sinks
        self.rope = model.rope(config.frame_rate)

    def check(self, question: str, max_new_tokens: int) -> tuple[list[int], list[int]]:
        """Validate; return the bare question's ids and the prompt's ids after the video."""
        if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise InvalidInputError(f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS}]")
        if not isinstance(question, str) or not question.strip():
            raise InvalidInputError("the question must be a non-empty string")
        bare = self.model.tokenize(question)
        if len(bare) > self.config.max_question_tokens:
            raise InvalidInputError(f"the question has {len(bare)} tokens; the limit is {self.config.max_question_tokens}")
        parts = self.model.prompt_parts(self.system_prompt, question)
        if parts.prefix_ids != self.prefix_ids:
            raise UnsupportedModelError("the chat template puts question text before the video")
        return bare, parts.suffix_ids

    def generation(self, memory: StreamMemory, question: str, max_new_tokens: int) -> "Generation":
        """Retrieve and prepare an answer; iterate the result for its tokens. Call check() first
        or let this do it; the memory is only read here, not during decoding."""
        bare_ids, suffix_ids = self.check(question, max_new_tokens)
        if not memory.units and not memory.features:
            raise NoFramesError("no frames have been ingested in this stream yet")
        selection = self.select(memory, bare_ids)
        contexts = [selection.context(layer, memory.sinks[layer]) for layer in range(self.model.dims.layers)]
        return Generation(self.model, contexts, suffix_ids, max_new_tokens, _evidence(selection), self.rope)

    def ask(self, memory: StreamMemory, question: str, max_new_tokens: int = 64) -> Answer:
        generation = self.generation(memory, question, max_new_tokens)
        token_ids = list(generation)
        return Answer(self.model.decode(token_ids), token_ids, generation.evidence, generation.prompt_tokens,
                      generation.first_token_logits)

    def select(self, memory: StreamMemory, question_ids: list[int]) -> Selection:
        """The retrieval pass: the bare question, layer by layer, each layer choosing its blocks."""
        if self.config.retrieval == "uniform":
            return self._uniform_selection(memory)
        selection = Selection(self.config, [memory.layer_view(layer) for layer in range(self.model.dims.layers)])
        if self.config.retrieval != "none":

            def retrieved(layer, query_mean):
                selection.choose_layer(layer, query_mean)
                return selection.context(layer, memory.sinks[layer])

            self.model.forward(self.model.embed(question_ids), ContextPlan(self.rope, retrieved))
            selection.finalize()
        return selection

    def _uniform_selection(self, memory: StreamMemory) -> Selection:
        """The base model on top_k frames sampled uniformly from the stream, encoded afresh."""
        items = memory.features
        picks = sorted(set(np.linspace(0, len(items) - 1, min(self.config.top_k, len(items))).round().astype(int).tolist()))
        plan = ContextPlan(self.rope, lambda layer, _q: [memory.sinks[layer]], new_units=list(range(len(picks))))
        self.model.forward(torch.cat([items[i].tokens for i in picks]), plan)
        n = self.model.dims.tokens_per_unit

        def view(layer: int) -> LayerView:
            def gather(indices):
                return [Visual(plan.keys[layer][:, i * n : (i + 1) * n], plan.values[layer][:, i * n : (i + 1) * n], i)
                        for i in indices]

            return LayerView(reps=torch.empty(0), gather=gather, span=lambda i: (items[picks[i]].frames, items[picks[i]].times),
                             size=len(picks))

        return Selection(self.config, [view(layer) for layer in range(self.model.dims.layers)])


class Generation:
    """Greedy tokens over a fixed per-layer context, as an iterator (once)."""

    def __init__(self, model: VideoLLM, contexts, suffix_ids: list[int], max_new_tokens: int, evidence: list[Evidence],
                 rope: Rope):
        self.model = model
        self.suffix_ids = suffix_ids
        self.max_new_tokens = max_new_tokens
        self.evidence = evidence
        self.plan = AnswerPlan(rope, contexts, capacity=len(suffix_ids) + 1 + max_new_tokens)
        # the prompt as the model sees it: [sinks | retrieved | recent] (layers may differ in
        # length under adaptive budgets: the longest counts), the newline, question and header
        self.prompt_tokens = max(self.plan.lengths) + len(model.newline_embedding) + len(suffix_ids)
        self.token_ids: list[int] = []  # generated so far
        self.first_token_logits: torch.Tensor | None = None

    def __iter__(self) -> Iterator[int]:
        # the video's trailing newline embedding, then the question and the assistant header
        embeds = torch.cat([self.model.newline_embedding, self.model.embed(self.suffix_ids)])
        for step in range(self.max_new_tokens):
            logits = self.model.logits(self.model.forward(embeds, self.plan)[-1])
            if step == 0:
                self.first_token_logits = logits
            token = int(logits.argmax())
            self.token_ids.append(token)
            yield token
            if token in self.model.eos_ids:
                return
            embeds = self.model.embed([token])

    def text_pieces(self) -> Iterator[str]:
        """The answer text, piece by piece as tokens are generated."""
        emitted = ""
        for _ in self:
            text = self.model.decode(self.token_ids)
            if len(text) > len(emitted):
                yield text[len(emitted) :]
                emitted = text


def _evidence(selection: Selection) -> list[Evidence]:
    found: dict[tuple[int, int], list] = {}  # frames -> [times, score sum, layers]
    for layer, chosen in enumerate(selection.chosen):
        view, scores = selection.views[layer], selection.scores[layer]
        scores = scores.tolist() if scores is not None else None  # one device sync per layer, not per item
        for i in chosen:
            frames, times = view.span(i)
            entry = found.setdefault(frames, [times, 0.0, 0])
            entry[1] += scores[i] if scores is not None else 0.0
            entry[2] += 1
    return [Evidence(frames, times, total / layers, layers) for frames, (times, total, layers) in sorted(found.items())]
