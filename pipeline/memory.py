"""StreamMemory: everything a stream retains, and the views retrieval and encoding take of it.

Memory changes only by `apply(SegmentUpdate)`: an encoded segment plus the compression decisions
about it. Replicas (a prefill actor's, an answering actor's) that apply the same updates in the
same order hold the same memory, without a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline.config import EngineConfig
from pipeline.kv_store import KV, LayerBlocks, PageSlice, TokenPool, UnitInfo, Visual, Window, tensor_bytes
from pipeline.model import ModelDims
from pipeline.retrieval import LayerView
from pipeline.segmenter import FrameFeature


@dataclass
class SegmentUpdate:
    segment: int
    units: list[UnitInfo]  # new blocks: the segment's frames, then its summary
    kv: list[list[KV]]  # [unit][layer] (keys, values) pre-RoPE [Hkv, n, d]
    recent_queries: dict[int, torch.Tensor] = field(default_factory=dict)  # VSB: layer -> [Hq, r, d]
    features: list[FrameFeature] = field(default_factory=list)  # uniform baseline: visual tokens only
    keep: list[list[int]] | None = None  # per layer, indices into units kept as blocks (None: all)
    pool_keep: list[torch.Tensor | None] | None = None  # VSB: per layer, long-term tokens kept


class StreamMemory:
    def __init__(self, dims: ModelDims, config: EngineConfig, sinks: list[KV]):
        self.dims = dims
        self.config = config
        self.sinks = sinks  # per layer [Hkv, S, d]
        self.blocks = [LayerBlocks() for _ in range(dims.layers)]
        # fifo (recent-N) with no explicit window: new frames see exactly the N frames it keeps
        limit, units = config.n_local, None
        if limit is None and config.compression == "fifo":
            units = config.recent_blocks  # units, not tokens: Qwen3-VL's units vary in length
        self.window = Window(dims.layers, limit, units)
        self.pools = [TokenPool() for _ in range(dims.layers)] if config.compression == "vsb" else None
        self.units: dict[int, UnitInfo] = {}
        self.features: list[FrameFeature] = []  # visual tokens, kept only by the uniform baseline
        self.recent_queries: dict[int, torch.Tensor] = {}  # layer -> last vision queries [Hq, r, d]
        self.next_position = sinks[0][0].shape[1]  # original position of the next token

    # ---- encoding ---------------------------------------------------------------------------
    def ingest_context(self, layer: int) -> list[KV]:
        """What new tokens attend to: sinks, LiveVLM's long-term memory, the local window."""
        pool = self.pools[layer] if self.pools is not None and len(self.pools[layer]) else None
        return [self.sinks[layer], *([self.pool_part(layer, 0, len(pool))] if pool else []), *self.window.parts(layer)]

    def pool_part(self, layer: int, start: int, end: int) -> Visual:
        """Long-term tokens [start, end) of a layer, tagged with their units and places there."""
        pool = self.pools[layer]
        uids, positions = pool.uids[start:end], pool.positions[start:end]  # as they are now (compaction replaces them)

        def unit_table(field: str):  # per token, a field of its unit; computed only if the placement asks (M-RoPE)
            present, inverse = torch.unique(uids, return_inverse=True)
            values = [getattr(self.units[int(u)], field) for u in present]
            if field == "tokens":
                values = [v or self.dims.tokens_per_unit for v in values]
            return torch.tensor(values, dtype=torch.long)[inverse]

        return Visual(pool.keys[:, start:end], pool.values[:, start:end], uids,
                      lambda: positions - unit_table("first_position"), lambda: unit_table("tokens"))

    def next_units(self, kinds_frames_times: list[tuple], segment: int, lengths: list[int] | None = None) -> list[UnitInfo]:
        """UnitInfos for the next blocks of the stream (not yet registered: apply does that);
        `lengths`: their stored tokens (default: tokens_per_unit each)."""
        first_uid, first_position = len(self.units), self.next_position
        lengths = lengths or [self.dims.tokens_per_unit] * len(kinds_frames_times)
        units = []
        for i, ((kind, frames, times), length) in enumerate(zip(kinds_frames_times, lengths)):
            units.append(UnitInfo(first_uid + i, kind, frames, times, segment, first_position, length))
            first_position += length
        return units

    def apply(self, update: SegmentUpdate) -> None:
        for unit in update.units:
            self.units[unit.uid] = unit
        self.next_position += sum(unit.tokens or self.dims.tokens_per_unit for unit in update.units)
        self.features.extend(update.features)
        if update.recent_queries:
            self.recent_queries = update.recent_queries
        for layer, blocks in enumerate(self.blocks):
            for i in update.keep[layer] if update.keep is not None else range(len(update.units)):
                blocks.add(update.units[i].uid, update.kv[i][layer])
            if self.config.compression == "fifo":  # recent-N retains its last N blocks only
                blocks.drop_oldest(len(blocks) - self.config.recent_blocks)
        evicted = [old for unit, kv in zip(update.units, update.kv) for old in self.window.push(unit.uid, kv)]
        if self.pools is not None:
            for layer, pool in enumerate(self.pools):
                for uid, per_layer in evicted:
                    pool.append(*per_layer[layer], self.units[uid].first_position, uid)
        if update.pool_keep is not None:
            self.compact_pools(update.pool_keep)

    def adopt(self, updates: list[SegmentUpdate], kvs: list[list[list[KV | PageSlice | None]]]) -> None:
        """Hold kvs[u][unit][layer] (equal KV kept elsewhere: slices of the object store's copy,
        see cache_store/wire.py share_updates) instead of the applied updates' own, the last
        ones applied; None keeps the update's own. The window holds the updates' per-unit lists,
        so those are replaced in place; blocks, among the newest, by identity."""
        swap: list[dict[int, KV | PageSlice]] = [{} for _ in self.blocks]  # per layer: id(old pair) -> new
        for update, kv in zip(updates, kvs):
            for i, per_layer in enumerate(kv):
                for layer, new in enumerate(per_layer):
                    if new is not None:
                        swap[layer][id(update.kv[i][layer])] = new
                        update.kv[i][layer] = new
        newest = sum(len(update.units) for update in updates)
        for layer, blocks in enumerate(self.blocks):
            for j in range(max(0, len(blocks) - newest), len(blocks)):
                if (new := swap[layer].get(id(blocks.kv[j]))) is not None:
                    blocks.kv[j] = new

    def compact_pools(self, pool_keep: list[torch.Tensor | None]) -> None:
        for pool, keep in zip(self.pools, pool_keep):
            if keep is not None:
                pool.keep(keep)

    # ---- retrieval --------------------------------------------------------------------------
    def layer_view(self, layer: int) -> LayerView:
        if self.pools is not None:
            return self._page_view(layer)
        blocks = self.blocks[layer]
        recent = list(range(max(0, len(blocks) - self.config.recent_blocks), len(blocks)))

        def span(i: int):
            unit = self.units[blocks.uids[i]]
            return unit.frames, unit.times

        return LayerView(reps=blocks.reps, gather=blocks.gather, span=span, size=len(blocks), always=recent)

    def _page_view(self, layer: int) -> LayerView:
        """Long-term pages (LiveVLM PaR), with the short-term window as the tail."""
        pool = self.pools[layer]
        pages = pool.pages(self.config.page_tokens)
        if pages:
            reps = pool.page_reps(self.config.page_tokens)
        else:
            reps = torch.empty(0, self.dims.kv_heads, self.dims.head_dim, device=self.sinks[layer][0].device)
        def span(i: int):
            first, last = self.units[int(pool.uids[pages[i][0]])], self.units[int(pool.uids[pages[i][1] - 1])]
            return (first.frames[0], last.frames[1]), (first.times[0], last.times[1])

        def gather(indices: list[int]) -> list[KV]:
            return [self.pool_part(layer, *pages[i]) for i in indices]

        return LayerView(reps=reps, gather=gather, span=span, size=len(pages), tail=self.window.parts(layer))

    # ---- accounting -------------------------------------------------------------------------
    def memory(self) -> dict[str, int]:
        """Exact bytes of retained KV by tier (a storage shared by tiers counts once, first tier)."""
        seen: set[tuple[int, int]] = set()
        tiers = {
            "sinks": tensor_bytes([t for kv in self.sinks for t in kv], seen),
            "blocks": tensor_bytes([t for b in self.blocks for t in b.tensors()], seen),
            "long_term": tensor_bytes([t for p in self.pools or [] for t in p.tensors()], seen),
            "window": tensor_bytes(self.window.tensors(), seen),
            "index": tensor_bytes([t for b in self.blocks if len(b) for t in b.index_tensors()], seen),
            "features": tensor_bytes([t for f in self.features for t in (f.tokens, f.deepstack) if t is not None], seen),
        }
        tiers["total"] = sum(tiers.values())  # "features": the uniform baseline's visual tokens (and deepstack)
        return tiers
