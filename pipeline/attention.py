"""Streaming attention: an attention function registered with transformers' AttentionInterface.

The engine runs the model's own decoder layers with identity rotary embeddings (position ids 0),
so each layer hands this function PRE-RoPE queries and keys. A plan, passed through the forward's
kwargs as `streamkv_plan`, decides what each layer attends to and at which positions:

- ContextPlan: new tokens attend to a per-layer context chosen by a callback (the local window for
  ingest, retrieved blocks for the question pass, a segment for the guidance prompt), placed by
  the model's Rope (positions.py: contiguous from 0 for 1-D RoPE, M-RoPE's grid for Qwen-VL), then
  causally to themselves after it. It records the new tokens' pre-RoPE keys/values and the mean
  query of each layer.
- AnswerPlan: prefill and greedy decoding over a fixed per-layer context, whose rotated keys are
  computed once and kept with the answer's own growing cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

if TYPE_CHECKING:
    from pipeline.positions import Rope

ATTENTION_NAME = "streamkv"

KV = tuple[torch.Tensor, torch.Tensor]  # keys, values [Hkv, n, d]
# context(layer, query_mean [Hq, d] fp32) -> the context's parts in order, pre-RoPE; they are
# concatenated once, together with the new tokens
ContextFn = Callable[[int, torch.Tensor], list[KV]]


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
    # Lower-right causal as a CausalBias, not a dense mask: CUDA then runs flash attention (GQA
    # native). A dense mask goes to cuDNN, which builds a graph for every new shape (~20 ms a call
    # on an H200), and streaming shapes rarely repeat. CPU materialises the same mask.
    mask = causal_lower_right(query.shape[1], keys.shape[1])
    out = F.scaled_dot_product_attention(
        query[None], keys[None], values[None], attn_mask=mask, scale=scaling, enable_gqa=query.shape[0] != keys.shape[0]
    )
    return out[0].transpose(0, 1)


class ContextPlan:
    """New tokens attend to [context(layer) | themselves], placed by `rope`.

    new_units: the uids of the visual units the new tokens are (ingest), None for text;
    new_lengths: their tokens each (None: the model's tokens_per_unit).
    After the forward: `keys[l]`, `values[l]` hold the new tokens' pre-RoPE KV [Hkv, T, d],
    `query_means[l]` their mean pre-RoPE query [Hq, d] (fp32), `last_queries[l]` the last
    `keep_queries` pre-RoPE queries [Hq, r, d].
    """

    def __init__(self, rope: "Rope", context: ContextFn, keep_queries: int = 0, new_units: list[int] | None = None,
                 new_lengths: list[int] | None = None):
        self.rope = rope
        self.context = context
        self.keep_queries = keep_queries
        self.new_units = new_units
        self.new_lengths = new_lengths
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.query_means: dict[int, torch.Tensor] = {}
        self.last_queries: dict[int, torch.Tensor] = {}

    def attend(self, layer, query, key, value, scaling):
        query_mean = query.float().mean(dim=1)  # [Hq, d]
        parts = self.context(layer, query_mean)
        keys = torch.cat([k for k, _ in parts] + [key], dim=1)
        values = torch.cat([v for _, v in parts] + [value], dim=1)
        place = self.rope.place(parts, query.shape[1], self.new_units, self.new_lengths)
        out = causal_attention(self.rope.rotate(query, place.new), self.rope.rotate(keys, place.joined()), values, scaling)
        self.keys[layer], self.values[layer], self.query_means[layer] = key, value, query_mean
        if self.keep_queries:
            self.last_queries[layer] = query[:, -self.keep_queries :]
        return out


class AnswerPlan:
    """Prefill then decode over a fixed context per layer: [context (placed by `rope`) | answer],
    the answer's text at consecutive positions after the context.

    The rotated context and the answer's own KV live in one buffer per layer, preallocated for
    `capacity` answer tokens, so a decode step writes one slot instead of copying the context.
    """

    def __init__(self, rope: "Rope", contexts: list[list[KV]], capacity: int):
        self.rope = rope
        self.keys: list[torch.Tensor] = []  # per layer [Hkv, C + capacity, d], rotated
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []
        self.positions: list[int] = []  # per layer, the position of the next answer token
        for parts in contexts:  # per layer, the context's parts in order
            first = parts[0][0]
            n_ctx = sum(k.shape[1] for k, _ in parts)
            keys = first.new_empty(first.shape[0], n_ctx + capacity, first.shape[2])
            values = torch.empty_like(keys)
            offset = 0
            for k, v in parts:
                keys[:, offset : offset + k.shape[1]] = k
                values[:, offset : offset + k.shape[1]] = v
                offset += k.shape[1]
            place = rope.place(parts, 0)
            keys[:, :n_ctx] = rope.rotate(keys[:, :n_ctx], place.context)
            self.keys.append(keys)
            self.values.append(values)
            self.lengths.append(n_ctx)
            self.positions.append(place.next)

    def attend(self, layer, query, key, value, scaling):
        start, end = self.lengths[layer], self.lengths[layer] + query.shape[1]
        position = self.positions[layer]
        self.keys[layer][:, start:end] = self.rope.rotate(key, position)
        self.values[layer][:, start:end] = value
        self.lengths[layer], self.positions[layer] = end, position + query.shape[1]
        return causal_attention(self.rope.rotate(query, position), self.keys[layer][:, :end], self.values[layer][:, :end], scaling)
