"""A stream's memory on the wire: SegmentUpdates and whole-memory snapshots as KV pages (numpy,
zero-copy through Ray's object store) plus msgpack-able metadata.

Updates keep replicas in step (every replica applies the same ones in order); a snapshot brings
a new or restarted replica to the current state in one transfer.
"""

from __future__ import annotations

import numpy as np
import torch

from cache_store.envelope import Wire, features_wire
from cache_store.pages import KVPage, to_numpy
from pipeline.config import EngineConfig
from pipeline.kv_store import PageSlice, UnitInfo
from pipeline.memory import SegmentUpdate, StreamMemory
from pipeline.model import ModelDims
from pipeline.segmenter import FrameFeature, Segment


def _unit_meta(unit: UnitInfo) -> list:
    return [unit.uid, unit.kind, list(unit.frames), list(unit.times), unit.segment, unit.first_position, unit.tokens]


def _unit(meta: list) -> UnitInfo:
    """_unit_meta's list (6 elements: from before units carried their stored tokens)."""
    uid, kind, frames, times, segment, first, *tokens = meta
    return UnitInfo(uid, kind, tuple(frames), tuple(times), segment, first, *tokens)


def _page(keys, values, stream_id: str, model_id: str, uid: int, kind: str, frames=(0, 0), times=(0.0, 0.0), **extra):
    return KVPage.from_tensors(keys.contiguous(), values.contiguous(), model_id=model_id, stream_id=stream_id,
                               unit_id=uid, frame_range=frames, time_range=times,
                               positions=(0, keys.shape[2]), kind=kind, extra=extra)


def _carried(t: torch.Tensor) -> np.ndarray:
    """A tensor as numpy in its own dtype: visual tokens and queries travel at the model's
    precision (bf16 halves float32's bytes), bf16 as a uint16 view since numpy has no bf16."""
    return to_numpy(t)


def _tensor(a: np.ndarray, device, dtype: torch.dtype) -> torch.Tensor:
    """_carried's array as a tensor (a copy: object-store arrays are read-only), then `dtype`."""
    a = np.asarray(a)
    if a.dtype == np.uint16:  # bf16's carrier
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16).to(device, dtype)
    return torch.from_numpy(np.array(a)).to(device, dtype)


# ---- visual tokens and segments ----------------------------------------------------------------
# One array of a unit's features: its visual tokens [n, hidden], or with deepstack (Qwen3-VL)
# the visual tokens and the k deepstack features stacked [1 + k, n, hidden], as
# PrefillWorker.encode_frames returns them (the coordinator keeps and replays them as they are).
def _stacked(item: FrameFeature) -> torch.Tensor:
    return item.tokens if item.deepstack is None else torch.cat([item.tokens[None], item.deepstack])


def pack_features(items: list[FrameFeature]) -> Wire:
    tokens = _carried(torch.stack([_stacked(f) for f in items])) if items else None
    return features_wire(tokens, [f.frames for f in items], [f.times for f in items])


def unpack_features(wire: Wire, device, dtype: torch.dtype) -> list[FrameFeature]:
    if not wire.meta["features"]:
        return []
    tokens = _tensor(wire.arrays["features"], device, dtype)  # [T, n, hidden] or [T, 1 + k, n, hidden]
    deepstack = tokens[:, 1:] if tokens.dim() == 4 else None
    tokens = tokens[:, 0] if tokens.dim() == 4 else tokens
    return [FrameFeature(tokens[i], tuple(f), tuple(t), None if deepstack is None else deepstack[i])
            for i, (f, t) in enumerate(wire.meta["features"])]


def pack_segment(segment: Segment) -> Wire:
    wire = pack_features(segment.items)
    wire.meta["segment"] = segment.index
    return wire


def unpack_segment(wire: Wire, device, dtype: torch.dtype) -> Segment:
    return Segment(wire.meta["segment"], unpack_features(wire, device, dtype))


# ---- updates ----------------------------------------------------------------------------------
# An update travels as two objects. Its kept pages (one per layer: the KV of the units that layer
# keeps as blocks, in unit order, [1, Hkv, T_l, d]) are what replicas retain for good: the prefill
# actor puts them in the object store once (share_updates) and every replica on the node, the
# prefill's own included, maps that one copy (zero-copy, read-only views). The rest (units a layer
# does not keep, needed only while they are in the local window; visual tokens; VSB's queries)
# goes in the update itself, which replicas let go once those units leave the window.

def _kept(keep: list[list[int]] | None, units: int, layer: int) -> list[int]:
    """The units (indices) a layer keeps as blocks (keep None: all)."""
    return list(keep[layer]) if keep is not None else list(range(units))


def _lengths(update: SegmentUpdate) -> list[int]:
    """Each unit's stored tokens."""
    return [per_layer[0][0].shape[1] for per_layer in update.kv]


def kept_pages(update: SegmentUpdate, *, stream_id: str, model_id: str) -> list[KVPage]:
    """Per layer, the KV of the units it keeps as blocks, concatenated in unit order."""
    pages = []
    for layer in range(len(update.kv[0]) if update.kv else 0):
        parts = [update.kv[i][layer] for i in _kept(update.keep, len(update.units), layer)] or [tuple(t[:, :0] for t in update.kv[0][layer])]
        keys, values = torch.cat([k for k, _ in parts], 1), torch.cat([v for _, v in parts], 1)  # [Hkv, T_l, d]
        pages.append(_page(keys[None], values[None], stream_id, model_id, layer, "page", tier="kept"))
    return pages


def _place_kept(kv: list[list], update_keep, lengths: list[int], pages: list[KVPage], device) -> None:
    """kv[unit][layer] for every kept (unit, layer): slices of the kept pages (no copy on CPU)."""
    for layer, page in enumerate(pages):
        keys, values = page.to_tensors(device, shared=True)  # [1, Hkv, T_l, d]
        offset = 0
        for i in _kept(update_keep, len(kv), layer):
            kv[i][layer] = PageSlice(keys[0], values[0], offset, offset + lengths[i])
            offset += lengths[i]


def share_updates(updates: list[SegmentUpdate], memory: StreamMemory, put, *, stream_id: str, model_id: str) -> list:
    """Put the applied updates' kept pages in the object store, one object per update, in one
    `put` call (the node's page owner: actors/page_owner.py), and return their references for
    pack_update. On CPU, `memory` and the updates then hold views of those copies instead of
    their own tensors: the caller holds the KV no more than any replica does."""
    import ray

    refs = put([kept_pages(u, stream_id=stream_id, model_id=model_id) for u in updates])
    if updates and updates[0].kv[0][0][0].device.type == "cpu":
        kvs = []
        for update, pages in zip(updates, ray.get(refs)):
            kv = [[None] * len(pages) for _ in update.units]
            _place_kept(kv, update.keep, _lengths(update), pages, "cpu")
            kvs.append(kv)
        memory.adopt(updates, kvs)
    return refs


def segment_summary(update: SegmentUpdate) -> np.ndarray:
    """The segment's entry vector in the summary index, per layer [layers, Hkv * d] float32: its
    summary block's mean key, else the mean of its frames'. Made where the KV is (the prefill
    actor): the index's actor reads this, not the KV."""
    from pipeline.kv_store import mean_key

    summary = [i for i, u in enumerate(update.units) if u.kind == "summary"]
    chosen = summary or list(range(len(update.units)))
    return np.stack([
        torch.stack([mean_key(update.kv[i][layer][0]) for i in chosen]).mean(0).flatten().cpu().numpy()
        for layer in range(len(update.kv[0]))
    ]).astype(np.float32)


def pack_update(update: SegmentUpdate, *, stream_id: str, model_id: str, kept=None) -> Wire:
    """kept: share_updates' reference (else the kept pages travel inline)."""
    meta = {
        "segment": update.segment,
        "units": [_unit_meta(u) for u in update.units],
        "lengths": _lengths(update),
        "keep": update.keep,
        "pool_keep": None if update.pool_keep is None else [None if k is None else k.tolist() for k in update.pool_keep],
    }
    wire = pack_features(update.features)
    meta.update(wire.meta)
    layers = range(len(update.kv[0]) if update.kv else 0)
    kept_everywhere = set.intersection(*(set(_kept(update.keep, len(update.units), layer)) for layer in layers)) \
        if update.kv else set()
    pages = [  # the units some layer does not keep: the window's until they leave it
        _page(torch.stack([k for k, _ in per_layer]), torch.stack([v for _, v in per_layer]), stream_id, model_id,
              unit.uid, unit.kind, unit.frames, unit.times)
        for i, (unit, per_layer) in enumerate(zip(update.units, update.kv)) if i not in kept_everywhere
    ]
    arrays = {**wire.arrays, **{f"q{layer}": _carried(q) for layer, q in update.recent_queries.items()}}
    if update.units:
        arrays["summary"] = segment_summary(update)
    if kept is None and update.kv:
        kept = kept_pages(update, stream_id=stream_id, model_id=model_id)
    return Wire(meta, pages, arrays, kept=kept)


def unpack_update(wire: Wire, device: str | torch.device, dtype: torch.dtype) -> SegmentUpdate:
    """The update with its KV as views of the wire's arrays where they are on CPU (the object
    store's shared copy: never written), else copied to `device`."""
    meta = wire.meta
    units = [_unit(u) for u in meta["units"]]
    kv: list[list] = []
    if units:
        import ray

        pages = wire.kept if isinstance(wire.kept, list) else ray.get(wire.kept)
        kv = [[None] * len(pages) for _ in units]
        _place_kept(kv, meta["keep"], meta["lengths"], pages, device)
        by_uid = {unit.uid: i for i, unit in enumerate(units)}
        for page in wire.pages:
            keys, values = page.to_tensors(device, shared=True)  # [L, Hkv, n, d]
            i = by_uid[page.header.unit_id]
            kv[i] = [kv[i][l] if kv[i][l] is not None else (keys[l], values[l]) for l in range(keys.shape[0])]
    features = unpack_features(wire, device, dtype)
    queries = {int(name[1:]): _tensor(a, device, dtype) for name, a in wire.arrays.items() if name.startswith("q")}
    pool_keep = meta["pool_keep"]
    return SegmentUpdate(
        segment=meta["segment"],
        units=units,
        kv=kv,
        recent_queries=queries,
        features=features,
        keep=meta["keep"],
        pool_keep=None if pool_keep is None else [None if k is None else torch.tensor(k, dtype=torch.long) for k in pool_keep],
    )


# ---- snapshots --------------------------------------------------------------------------------
def pack_snapshot(memory: StreamMemory, *, stream_id: str, model_id: str) -> Wire:
    """Everything `memory` retains; per layer, tiers are packed as one page of concatenated tokens."""
    layers = range(memory.dims.layers)
    stack = lambda parts: (torch.stack([k for k, _ in parts]), torch.stack([v for _, v in parts]))  # noqa: E731
    pages = [_page(*stack(memory.sinks), stream_id, model_id, -1, "sink")]
    meta = {
        "units": [_unit_meta(u) for u in memory.units.values()],
        "next_position": memory.next_position,
        "blocks": [list(memory.blocks[l].uids) for l in layers],
        "window": memory.window.uids(),
    }
    features = pack_features(memory.features)
    meta.update(features.meta)
    arrays = {**features.arrays, **{f"q{layer}": _carried(q) for layer, q in memory.recent_queries.items()}}
    for layer in layers:
        blocks = memory.blocks[layer]
        if len(blocks):
            pages.append(_page(torch.cat(blocks.keys, 1)[None], torch.cat(blocks.values, 1)[None], stream_id, model_id,
                               layer, "page", tier="blocks"))
        window = memory.window.parts(layer)
        if window:
            keys, values = torch.cat([k for k, _ in window], 1), torch.cat([v for _, v in window], 1)
            pages.append(_page(keys[None], values[None], stream_id, model_id, layer, "page", tier="window"))
        if memory.pools is not None and len(memory.pools[layer]):
            pool = memory.pools[layer]
            pages.append(_page(pool.keys[None], pool.values[None], stream_id, model_id, layer, "page", tier="pool"))
            arrays[f"pool_positions{layer}"] = pool.positions.numpy()
            arrays[f"pool_uids{layer}"] = pool.uids.numpy()
    return Wire(meta, pages, arrays)


def unpack_snapshot(wire: Wire, dims: ModelDims, config: EngineConfig, device, dtype: torch.dtype) -> StreamMemory:
    meta = wire.meta
    by_tier = {(p.header.extra.get("tier"), p.header.unit_id): p for p in wire.pages if p.header.kind == "page"}
    sink_keys, sink_values = next(p for p in wire.pages if p.header.kind == "sink").to_tensors(device, shared=True)
    memory = StreamMemory(dims, config, [(sink_keys[l], sink_values[l]) for l in range(dims.layers)])
    memory.units = {u.uid: u for u in map(_unit, meta["units"])}
    length = {uid: u.tokens or dims.tokens_per_unit for uid, u in memory.units.items()}  # Qwen3-VL's vary

    def offsets(uids: list[int]) -> list[int]:  # each unit's first token in a tier's page, and the end
        return np.cumsum([0] + [length[uid] for uid in uids]).tolist()

    memory.next_position = meta["next_position"]
    per_layer_window: list[dict[int, tuple]] = []
    for layer in range(dims.layers):
        shared: dict[int, tuple] = {}
        if ("blocks", layer) in by_tier:
            keys, values = by_tier[("blocks", layer)].to_tensors(device, shared=True)
            at = offsets(meta["blocks"][layer])
            for i, uid in enumerate(meta["blocks"][layer]):
                kv = PageSlice(keys[0], values[0], at[i], at[i + 1])  # views of the snapshot: never written
                memory.blocks[layer].add(uid, kv)
                shared[uid] = kv
        if ("window", layer) in by_tier:  # window units that are also blocks share their storage
            keys, values = by_tier[("window", layer)].to_tensors(device, shared=True)
            at = offsets(meta["window"])
            for i, uid in enumerate(meta["window"]):
                shared.setdefault(uid, (keys[0, :, at[i] : at[i + 1]], values[0, :, at[i] : at[i + 1]]))
        per_layer_window.append(shared)
        if ("pool", layer) in by_tier:
            keys, values = by_tier[("pool", layer)].to_tensors(device, shared=True)
            pool = memory.pools[layer]
            pool.keys, pool.values = keys[0], values[0]
            pool.positions = torch.from_numpy(np.array(wire.arrays[f"pool_positions{layer}"]))
            pool.uids = torch.from_numpy(np.array(wire.arrays[f"pool_uids{layer}"]))
    for uid in meta["window"]:
        memory.window.push(uid, [per_layer_window[layer][uid] for layer in range(dims.layers)])
    memory.recent_queries = {int(k[1:]): _tensor(a, device, dtype)
                             for k, a in wire.arrays.items() if k.startswith("q")}
    memory.features = unpack_features(wire, device, dtype)
    return memory
