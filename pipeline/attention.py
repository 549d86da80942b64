"""Streaming attention: an attention function registered with transformers' AttentionInterface.

The engine runs the model's own decoder layers with identity rotary embeddings (position ids 0),
so each layer hands this function PRE-RoPE queries and keys. A plan, passed through the forward's
kwargs as `streamkv_plan`, decides what each layer attends to and at which positions:

- ContextPlan: new tokens attend to a per-layer context chosen by a callback (the local window for
  ingest, retrieved blocks for the question pass, a segment for the guidance prompt), placed at
  contiguous positions 0..C-1, then causally to themselves at C..C+T-1. It records the new tokens'
  pre-RoPE keys/values and the mean query of each layer.
- AnswerPlan: prefill and greedy decoding over a fixed per-layer context, whose rotated keys are
  computed once and kept with the answer's own growing cache.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "streamkv"

# context(layer, query_mean [Hq, d] fp32) -> (keys [Hkv, C, d], values [Hkv, C, d]) pre-RoPE
ContextFn = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class AttentionPlan(Protocol):
    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
        """query [Hq, T, d], key/value [Hkv, T, d] pre-RoPE -> attention output [T, Hq, d]."""


def streamkv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, streamkv_plan=None, **kwargs):
    if streamkv_plan is None:  # an ordinary forward/generate: plain SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    out = streamkv_plan.attend(module.layer_idx, query[0], key[0], value[0], scaling)
    return out[None], None


def register_attention() -> None:
    AttentionInterface.register(ATTENTION_NAME, streamkv_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def causal_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
    """query [Hq, T, d] over keys/values [Hkv, C + T, d]: all C context tokens, then causal.

    Returns [T, Hq, d]. Inputs are already rotated.
    """
    n_new, n_all = query.shape[1], keys.shape[1]
    mask = None
    if n_new > 1:
        mask = torch.ones(n_new, n_all, dtype=torch.bool, device=query.device).tril(diagonal=n_all - n_new)
    out = F.scaled_dot_product_attention(
        query[None], keys[None], values[None], attn_mask=mask, scale=scaling, enable_gqa=query.shape[0] != keys.shape[0]
    )
    return out[0].transpose(0, 1)


class ContextPlan:
    """New tokens attend to [context(layer) | themselves] at contiguous positions from 0.

    After the forward: `keys[l]`, `values[l]` hold the new tokens' pre-RoPE KV [Hkv, T, d],
    `query_means[l]` their mean pre-RoPE query [Hq, d] (fp32), `last_queries[l]` the last
    `keep_queries` pre-RoPE queries [Hq, r, d].
    """

    def __init__(self, rotate: Callable, context: ContextFn, keep_queries: int = 0):
        self.rotate = rotate
        self.context = context
        self.keep_queries = keep_queries
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.query_means: dict[int, torch.Tensor] = {}
        self.last_queries: dict[int, torch.Tensor] = {}

    def attend(self, layer, query, key, value, scaling):
        query_mean = query.float().mean(dim=1)  # [Hq, d]
        ctx_keys, ctx_values = self.context(layer, query_mean)
        n_ctx, n_new = ctx_keys.shape[1], query.shape[1]
        keys = torch.cat([ctx_keys, key], dim=1)
        positions = torch.arange(n_ctx + n_new, device=query.device)
        out = causal_attention(
            self.rotate(query, positions[n_ctx:]),
            self.rotate(keys, positions),
            torch.cat([ctx_values, value], dim=1),
            scaling,
        )
        self.keys[layer], self.values[layer], self.query_means[layer] = key, value, query_mean
        if self.keep_queries:
            self.last_queries[layer] = query[:, -self.keep_queries :]
        return out


class AnswerPlan:
    """Prefill then decode over a fixed context per layer: [context (positions 0..C-1) | answer].

    The rotated context and the answer's own KV live in one buffer per layer, preallocated for
    `capacity` answer tokens, so a decode step writes one slot instead of copying the context.
    """

    def __init__(self, rotate: Callable, contexts: list[tuple[torch.Tensor, torch.Tensor]], capacity: int):
        self.rotate = rotate
        self.keys: list[torch.Tensor] = []  # per layer [Hkv, C + capacity, d], rotated
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []
        for ctx_keys, ctx_values in contexts:
            kv_heads, n_ctx, head_dim = ctx_keys.shape
            keys = ctx_keys.new_empty(kv_heads, n_ctx + capacity, head_dim)
            values = ctx_values.new_empty(kv_heads, n_ctx + capacity, head_dim)
            keys[:, :n_ctx] = rotate(ctx_keys, torch.arange(n_ctx, device=ctx_keys.device))
            values[:, :n_ctx] = ctx_values
            self.keys.append(keys)
            self.values.append(values)
            self.lengths.append(n_ctx)

    def attend(self, layer, query, key, value, scaling):
        start, end = self.lengths[layer], self.lengths[layer] + query.shape[1]
        positions = torch.arange(start, end, device=query.device)
        self.keys[layer][:, start:end] = self.rotate(key, positions)
        self.values[layer][:, start:end] = value
        self.lengths[layer] = end
        return causal_attention(
            self.rotate(query, positions), self.keys[layer][:, :end], self.values[layer][:, :end], scaling
        )
