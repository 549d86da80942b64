"""Answering over a stream's memory: retrieval pass per layer on the bare question, prefill of the
templated prompt on [sinks | retrieved | recent], greedy decoding (or sampling: pipeline/sampling.py). It reads the memory, never
changes it, so any replica of a stream's memory can answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from pipeline.attention import AnswerPlan, ContextPlan
from pipeline.config import EngineConfig
from pipeline.conversation import MAX_HISTORY_TOKENS, Conversation
from pipeline.errors import InvalidInputError, NoFramesError, UnsupportedModelError
from pipeline.kv_store import Visual
from pipeline.memory import StreamMemory
from pipeline.model import VideoLLM
from pipeline.positions import Rope
from pipeline.retrieval import LayerView, Selection
from pipeline.sampling import GREEDY, SamplingParams, TokenSampler, cut_at_stop, held_back

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
    stopped: bool = False  # a stop string ended it


class Answerer:
    def __init__(self, model: VideoLLM, config: EngineConfig, system_prompt: str | None):
        self.model = model
        self.config = config
        self.system_prompt = system_prompt
        self.prefix_ids = model.prompt_parts(system_prompt, "").prefix_ids  # the stream's sinks
        self.rope = model.rope(config.frame_rate)

    def check(self, question: str | Conversation, max_new_tokens: int) -> tuple[list[int], list[int]]:
        """Validate; return the bare question's ids and the prompt's ids after the video (the
        earlier turns of a Conversation included: pipeline/conversation.py)."""
        if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise InvalidInputError(f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS}]")
        conversation = question if isinstance(question, Conversation) else Conversation(question)
        if not isinstance(conversation.question, str) or not conversation.question.strip():
            raise InvalidInputError("the question must be a non-empty string")
        bare = self.model.tokenize(conversation.question)
        if len(bare) > self.config.max_question_tokens:
            raise InvalidInputError(f"the question has {len(bare)} tokens; the limit is {self.config.max_question_tokens}")
        parts = self.model.prompt_parts(self.system_prompt, conversation)
        if parts.prefix_ids != self.prefix_ids:
            raise UnsupportedModelError("the chat template puts question text before the video")
        limit = self.config.max_question_tokens + MAX_HISTORY_TOKENS
        if len(parts.suffix_ids) > limit:
            raise InvalidInputError(f"the conversation after the video has {len(parts.suffix_ids)} tokens; the limit "
                                    f"is {limit}")
        return bare, parts.suffix_ids

    def generation(self, memory: StreamMemory, question: str | Conversation, max_new_tokens: int,
                   sampling: SamplingParams = GREEDY) -> "Generation":
        """Retrieve and prepare an answer; iterate the result for its tokens. Call check() first
        or let this do it; the memory is only read here, not during decoding."""
        bare_ids, suffix_ids = self.check(question, max_new_tokens)
        if not memory.units and not memory.features:
            raise NoFramesError("no frames have been ingested in this stream yet")
        selection = self.select(memory, bare_ids)
        contexts = [selection.context(layer, memory.sinks[layer]) for layer in range(self.model.dims.layers)]
        return Generation(self.model, contexts, suffix_ids, max_new_tokens, _evidence(selection), self.rope, sampling)

    def ask(self, memory: StreamMemory, question: str | Conversation, max_new_tokens: int = 64,
            sampling: SamplingParams = GREEDY) -> Answer:
        generation = self.generation(memory, question, max_new_tokens, sampling)
        token_ids = list(generation)
        return Answer(generation.text(), token_ids, generation.evidence, generation.prompt_tokens,
                      generation.first_token_logits, generation.stopped)

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
        inputs = self.model.unit_inputs([items[i].unit() for i in picks])  # Qwen3-VL: with timestamps
        plan = ContextPlan(self.rope, lambda layer, _q: [memory.sinks[layer]], new_units=list(range(len(picks))),
                           new_lengths=inputs.lengths)
        self.model.forward(inputs.embeds, plan, inputs.visual_mask, inputs.deepstack)
        offsets = inputs.offsets()

        def view(layer: int) -> LayerView:
            def gather(indices):
                return [Visual(plan.keys[layer][:, offsets[i] : offsets[i + 1]],
                               plan.values[layer][:, offsets[i] : offsets[i + 1]], i) for i in indices]

            return LayerView(reps=torch.empty(0), gather=gather, span=lambda i: (items[picks[i]].frames, items[picks[i]].times),
                             size=len(picks))

        return Selection(self.config, [view(layer) for layer in range(self.model.dims.layers)])


class Generation:
    """Tokens over a fixed per-layer context (greedy unless `sampling` says otherwise), as an
    iterator (once). A stop string ends it; the text leaves the stop string out."""

    def __init__(self, model: VideoLLM, contexts, suffix_ids: list[int], max_new_tokens: int, evidence: list[Evidence],
                 rope: Rope, sampling: SamplingParams = GREEDY):
        self.model = model
        self.sampling = sampling
        self.sampler = TokenSampler(sampling, model.device)
        self.stopped = False  # a stop string ended the answer
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
            token = self.sampler(logits)
            self.token_ids.append(token)
            yield token
            if token in self.model.eos_ids:
                return
            if self.sampling.stop and cut_at_stop(self.model.decode(self.token_ids), self.sampling.stop)[1]:
                self.stopped = True
                return
            embeds = self.model.embed([token])

    def text(self) -> str:
        """The answer so far, up to a stop string."""
        return cut_at_stop(self.model.decode(self.token_ids), self.sampling.stop)[0]

    def text_pieces(self) -> Iterator[str]:
        """The answer text, piece by piece as tokens are generated (what might begin a stop
        string is held back until it is known not to)."""
        emitted, hold = "", held_back(self.sampling.stop)
        for _ in self:
            text = self.text()
            ready = text if self.stopped else text[: len(text) - hold]
            if len(ready) > len(emitted):
                yield ready[len(emitted) :]
                emitted = ready
        text = self.text()
        if len(text) > len(emitted):
            yield text[len(emitted) :]


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
