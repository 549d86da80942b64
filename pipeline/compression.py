"""Compression: what a stream retains of each encoded segment, as strategies over StreamMemory.

- KeepAll: every block, every layer (full, ReKV; recent-N, whose fifo rule the memory applies).
- Guidance (StreamKV): a fixed prompt that sees only the segment scores its frame blocks per layer;
  each layer keeps its top frames (layer-adaptive counts when enabled) plus the summary block.
- VSB (LiveVLM): blocks leave the short-term window into a long-term token pool per layer; when the
  pool exceeds M tokens, Vision Sink Bucketing keeps M of them.
"""

from __future__ import annotations

import math

import torch

from pipeline.attention import ContextPlan
from pipeline.budget import adaptive_budgets
from pipeline.config import EngineConfig
from pipeline.kv_store import KV, Visual, mean_key
from pipeline.memory import SegmentUpdate, StreamMemory
from pipeline.model import VideoLLM
from pipeline.retrieval import block_scores, choose


class KeepAll:
    """Every block, every layer (full, ReKV; fifo's recent-N rule is applied by the memory)."""

    def decide(self, update: SegmentUpdate) -> None:
        """Fill the update's decisions that depend only on the segment itself."""

    def compact(self, memory: StreamMemory, update: SegmentUpdate) -> None:
        """After `memory.apply(update)`: decisions that depend on the whole memory, recorded in the
        update (so replicas can apply them without a model) and applied here."""


class Guidance(KeepAll):
    def __init__(self, model: VideoLLM, config: EngineConfig):
        self.model = model
        self.config = config
        self.prompt = model.embed(model.tokenize(config.guidance_prompt))  # [P, hidden]

    def decide(self, update):
        units, kv = update.units, update.kv
        frames = [i for i, u in enumerate(units) if u.kind == "frame"]
        summaries = [i for i, u in enumerate(units) if u.kind != "frame"]
        layers = self.model.dims.layers
        if self.config.keep_ratio >= 1.0:
            return  # keep everything

        def segment_context(layer: int, _query_mean) -> list[KV]:  # the prompt sees only the segment
            return [Visual(*kv[i][layer], units[i].uid) for i in range(len(units))]

        plan = ContextPlan(self.model.rope(self.config.frame_rate), segment_context)
        self.model.forward(self.prompt, plan)
        scores = [
            block_scores(torch.stack([mean_key(kv[i][layer][0]) for i in frames]), plan.query_means[layer])
            for layer in range(layers)
        ]
        base = self.config.keep_ratio * len(frames)
        if self.config.adaptive:
            counts = adaptive_budgets(scores, round(base * layers), base, self.config.adaptive_temp)
        else:
            counts = [max(1, round(base))] * layers
        update.keep = [sorted([frames[i] for i in choose(s, c, [])] + summaries) for s, c in zip(scores, counts)]


class VSB(KeepAll):
    def __init__(self, model: VideoLLM, config: EngineConfig):
        self.model = model
        self.config = config

    def decide(self, update):
        update.keep = [[] for _ in range(self.model.dims.layers)]  # units live in the short-term window

    def compact(self, memory, update):
        if all(len(pool) <= self.config.budget_tokens for pool in memory.pools):
            return
        update.pool_keep = [
            vsb_select(self.token_scores(memory, layer), self.config.budget_tokens, self.config.vsb_top_ratio,
                       self.config.vsb_bucket) if len(pool) > self.config.budget_tokens else None
            for layer, pool in enumerate(memory.pools)
        ]
        memory.compact_pools(update.pool_keep)

    def token_scores(self, memory: StreamMemory, layer: int) -> torch.Tensor:
        """Mean attention each long-term token receives from the last r vision tokens, [N] fp32.

        Laid out as a question would see it, [sinks | long-term | short-term], at contiguous
        positions; the r queries are the last tokens of the short-term memory.
        """
        pool = memory.pools[layer]
        sinks = memory.sinks[layer][0]
        parts = memory.ingest_context(layer)  # [sinks | long-term | short-term]
        keys = torch.cat([k for k, _ in parts], dim=1)
        queries = memory.recent_queries[layer]  # [Hq, r, d]
        n_all, r = keys.shape[1], queries.shape[1]
        positions = torch.arange(n_all, device=keys.device)
        rope = self.model.rope(self.config.frame_rate)
        place = rope.place(parts, 0)
        rotated_q = rope.rotate(queries, place.context_slice(n_all - r, n_all)).float()
        rotated_k = rope.rotate(keys, place.context).float()
        rotated_k = rotated_k.repeat_interleave(self.model.dims.group, dim=0)  # [Hq, N_all, d]
        logits = rotated_q @ rotated_k.transpose(1, 2) * self.model.scaling  # [Hq, r, N_all]
        causal = positions[None, :] <= positions[n_all - r :, None]  # [r, N_all]
        attention = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        received = attention[:, :, sinks.shape[1] : sinks.shape[1] + len(pool)].mean(dim=1)  # [Hq, N]
        return received.max(dim=0).values if self.config.vsb_head_pool == "max" else received.mean(dim=0)


def vsb_select(scores: torch.Tensor, budget: int, top_ratio: float, bucket: int) -> torch.Tensor:
    """Vision Sink Bucketing: indices (ascending) of the `budget` tokens to keep out of len(scores).

    Tokens, in time order, are split into ceil(budget / bucket) buckets of consecutive tokens.
    Phase 1 keeps the top R = top_ratio * budget tokens whatever their bucket; phase 2 walks the
    rest by descending score and keeps a token only while its bucket holds fewer than `bucket`.
    """
    scores = scores.float().cpu()  # [N]: a few thousand scores; the index bookkeeping below is CPU-side
    n = scores.numel()
    if n <= budget:
        return torch.arange(n)
    n_buckets = math.ceil(budget / bucket)
    bucket_of = torch.arange(n) * n_buckets // n  # equal-count buckets by time order
    order = scores.argsort(descending=True, stable=True)
    top = max(1, min(budget, int(top_ratio * budget)))
    kept = torch.zeros(n, dtype=torch.bool)
    kept[order[:top]] = True
    room = (bucket - torch.bincount(bucket_of[order[:top]], minlength=n_buckets)).clamp_min(0)
    # Walking the rest by score, a token finds room iff fewer than room[b] better tokens of its
    # bucket came before it: its rank within its bucket decides, so the walk is vectorised.
    rest = order[top:]
    rest_buckets = bucket_of[rest]
    by_bucket = torch.argsort(rest_buckets, stable=True)  # grouped by bucket, score order kept
    grouped = rest_buckets[by_bucket]
    rank = torch.empty_like(rest)
    rank[by_bucket] = torch.arange(len(rest)) - torch.searchsorted(grouped, grouped)
    eligible = rest[rank < room[rest_buckets]]
    kept[eligible[: budget - top]] = True
    return kept.nonzero().flatten()


def make_compressor(model: VideoLLM, config: EngineConfig) -> KeepAll:
    return {
        "none": lambda: KeepAll(),
        "fifo": lambda: KeepAll(),
        "guidance": lambda: Guidance(model, config),
        "vsb": lambda: VSB(model, config),
    }[config.compression]()
