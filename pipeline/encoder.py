"""Streaming prefill: the system prompt once (the sinks), then each closed segment on top of what
the stream's memory gives as ingest context ([sinks | local window], plus LiveVLM's long-term)."""

from __future__ import annotations

import torch

from pipeline.attention import ContextPlan
from pipeline.config import EngineConfig
from pipeline.kv_store import KV
from pipeline.memory import SegmentUpdate, StreamMemory
from pipeline.model import VideoLLM
from pipeline.segmenter import FrameFeature, Segment


class SegmentEncoder:
    def __init__(self, model: VideoLLM, config: EngineConfig):
        self.model = model
        self.config = config

    def encode_sinks(self, prefix_ids: list[int]) -> list[KV]:
        """Per-layer pre-RoPE KV of the prompt prefix (system turn, user-turn header)."""
        dims = self.model.dims
        empty = torch.empty(dims.kv_heads, 0, dims.head_dim, device=self.model.device, dtype=self.model.dtype)
        plan = ContextPlan(self.model.rope(self.config.frame_rate), lambda layer, _q: [(empty, empty)])
        self.model.forward(self.model.embed(prefix_ids), plan)
        return [(plan.keys[layer], plan.values[layer]) for layer in range(dims.layers)]

    def encode(self, memory: StreamMemory, segment: Segment) -> SegmentUpdate:
        """The segment's blocks (frames, then StreamKV's summary pseudo-frame) as an update."""
        if self.config.retrieval == "uniform":  # the baseline encodes only at question time
            return SegmentUpdate(segment.index, [], [], features=list(segment.items))
        items = [("frame", item) for item in segment.items]
        if self.config.summaries:  # the token-wise mean of the segment, encoded like a frame
            mean = torch.stack([item.tokens for item in segment.items]).mean(dim=0)
            deepstack = segment.items[0].deepstack
            if deepstack is not None:  # Qwen3-VL: its deepstack features are the mean too (chosen)
                deepstack = torch.stack([item.deepstack for item in segment.items]).mean(dim=0)
            items.append(("summary", FrameFeature(mean, segment.frames, segment.times, deepstack)))
        keep_queries = self.config.vsb_queries if self.config.compression == "vsb" else 0
        inputs = self.model.unit_inputs([item.unit() for _, item in items])  # Qwen3-VL: with timestamps
        units = memory.next_units([(kind, item.frames, item.times) for kind, item in items], segment.index,
                                  inputs.lengths)
        plan = ContextPlan(self.model.rope(self.config.frame_rate), lambda layer, _q: memory.ingest_context(layer),
                           keep_queries, new_units=[unit.uid for unit in units], new_lengths=inputs.lengths)
        self.model.forward(inputs.embeds, plan, inputs.visual_mask, inputs.deepstack)
        offsets, layers = inputs.offsets(), range(self.model.dims.layers)
        # clone: each block owns its storage, so dropping it frees exactly its bytes
        kv = [[(plan.keys[l][:, a:b].clone(), plan.values[l][:, a:b].clone()) for l in layers]
              for a, b in zip(offsets, offsets[1:])]
        return SegmentUpdate(segment.index, units, kv, recent_queries=plan.last_queries)
