"""Retrieval: which stored KV a question attends to, chosen per layer from the question's queries.

A retriever presents each layer's candidates as a LayerView (block representatives, a way to
gather their KV, the blocks always included, and a tail always appended). Selection scores the
representatives against the mean pre-RoPE query of the bare question at that layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from pipeline.budget import adaptive_budgets
from pipeline.config import EngineConfig
from pipeline.kv_store import KV


@dataclass
class LayerView:
    reps: torch.Tensor  # [U, Hkv, d] fp32 representatives of the candidates, in time order
    gather: Callable[[list[int]], list[KV]]  # KV of the chosen candidates, in the given order
    span: Callable[[int], tuple[tuple[int, int], tuple[float, float]]]  # (frames, times) of a candidate
    size: int  # number of candidates
    always: list[int] = field(default_factory=list)  # candidates always included (the most recent)
    tail: list[KV] = field(default_factory=list)  # KV always after the chosen ones (short-term memory)


def block_scores(reps: torch.Tensor, query_mean: torch.Tensor, similarity: str = "dot") -> torch.Tensor:
    """Scores [U] of representatives [U, Hkv, d] against a mean query [Hq, d], in fp32.

    Equal to the dot product of the query heads concatenated with the KV heads expanded to
    query heads and concatenated: query heads of one group are summed first.
    """
    kv_heads, head_dim = reps.shape[1], reps.shape[2]
    grouped = query_mean.float().view(kv_heads, -1, head_dim)  # [Hkv, group, d]
    scores = torch.einsum("ukd,kd->u", reps.float(), grouped.sum(dim=1))
    if similarity == "cosine":
        rep_norm = reps.float().flatten(1).norm(dim=1) * grouped.shape[1] ** 0.5  # norm once expanded
        scores = scores / (rep_norm * query_mean.float().norm()).clamp_min(1e-12)
    return scores


def choose(scores: torch.Tensor, count: int, always: list[int]) -> list[int]:
    """The `always` candidates plus the top-scoring others, `count` in all, in time order."""
    count = min(count, scores.numel())
    chosen = set(always[-count:] if count else [])
    rest = scores.clone()
    if chosen:
        rest[list(chosen)] = float("-inf")
    extra = count - len(chosen)
    if extra > 0:
        chosen.update(rest.topk(extra).indices.tolist())
    return sorted(chosen)


class Selection:
    """Per-layer retrieval for one question: provisional choices during the question pass, then
    final counts (layer-adaptive budgets need every layer's scores, which exist only after it)."""

    def __init__(self, config: EngineConfig, views: list[LayerView]):
        self.config = config
        self.views = views
        self.scores: list[torch.Tensor | None] = [None] * len(views)
        everything = config.retrieval in ("none", "uniform")  # no scoring: every candidate is chosen
        self.chosen: list[list[int]] = [list(range(v.size)) if everything else [] for v in views]

    def base_count(self, view: LayerView) -> int:
        if self.config.retrieval == "page":
            return max(1, round(self.config.page_ratio * len(view.reps)))
        return self.config.top_k

    def choose_layer(self, layer: int, query_mean: torch.Tensor) -> list[int]:
        view = self.views[layer]
        if self.config.retrieval in ("none", "uniform") or view.size == 0:
            return self.chosen[layer]
        self.scores[layer] = block_scores(view.reps, query_mean, self.config.similarity)
        self.chosen[layer] = choose(self.scores[layer], self.base_count(view), view.always)
        return self.chosen[layer]

    def finalize(self) -> None:
        """Re-choose with layer-adaptive counts (total = base x layers), when enabled."""
        if not self.config.adaptive or self.config.retrieval in ("none", "uniform"):
            return
        scored = [i for i, s in enumerate(self.scores) if s is not None]
        if not scored:
            return
        base = self.base_count(self.views[scored[0]])
        counts = adaptive_budgets([self.scores[i] for i in scored], base * len(scored), base, self.config.adaptive_temp)
        for i, count in zip(scored, counts):
            self.chosen[i] = choose(self.scores[i], count, self.views[i].always)

    def context(self, layer: int, sinks: KV) -> list[KV]:
        """[sinks | chosen candidates | tail] for one layer, pre-RoPE, as parts."""
        view = self.views[layer]
        return [sinks, *view.gather(self.chosen[layer]), *view.tail]
