"""Each strategy's defining property: budgets, semantic segments, guidance, VSB, accounting."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import StreamSession
from pipeline.budget import adaptive_budgets
from pipeline.compression import vsb_select
from pipeline.config import make_config
from pipeline.memory import StreamMemory
from pipeline.segmenter import FrameFeature, Segmenter
from tests.stages import stream_updates


# ---- layer-adaptive budgets -------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=12),
    base=st.floats(0.5, 30),
    temp=st.floats(0.0, 0.95),
    total_factor=st.floats(0.0, 2.0),
    seed=st.integers(0, 1000),
    flat=st.booleans(),
)
def test_budgets_sum_to_the_total_within_clamps(sizes, base, temp, total_factor, seed, flat):
    g = torch.Generator().manual_seed(seed)
    scores = [torch.zeros(n) if flat else torch.randn(n, generator=g) * 3 for n in sizes]
    counts = adaptive_budgets(scores, round(base * len(sizes) * total_factor), base, temp)
    low = [min(n, max(1, math.floor(base * (1 - temp)))) for n in sizes]
    high = [min(n, max(1, math.ceil(base * (1 + temp)))) for n in sizes]
    total = min(max(round(base * len(sizes) * total_factor), sum(low)), sum(high))
    assert sum(counts) == total
    assert all(lo <= c <= hi for c, lo, hi in zip(counts, low, high))


def test_budgets_follow_score_concentration():
    peaked = torch.tensor([10.0] + [0.0] * 19)
    flat = torch.linspace(0, 1, 20)
    counts = adaptive_budgets([peaked, flat], total=16, base=8, temp=0.5)
    assert counts[0] < counts[1] and sum(counts) == 16


def test_one_block_segment_has_no_nan():
    assert adaptive_budgets([torch.tensor([3.0]), torch.tensor([1.0])], total=2, base=1, temp=0.5) == [1, 1]


# ---- semantic segmentation ------------------------------------------------------------------
def scenes_video(lengths, seed=0):
    """A video of solid random-colour scenes with known cuts (and a little noise within scenes)."""
    rng = np.random.default_rng(seed)
    frames, cuts, start = [], [], 0
    for length in lengths:
        colour = rng.integers(0, 256, 3)
        base = np.broadcast_to(colour, (32, 32, 3)).astype(np.int16)
        for _ in range(length):
            frames.append(np.clip(base + rng.integers(-1, 2, base.shape), 0, 255).astype(np.uint8))
        cuts.append((start, start + length))
        start += length
    return np.stack(frames), cuts


def segments_of(model, frames, **options):
    config = make_config("streamkv", **options)
    segmenter, out = Segmenter(config), []
    for i, tokens in enumerate(model.encode_frames(frames)):
        out += segmenter.push(FrameFeature(tokens, (i, i + 1), (float(i), float(i))))
    return out + [s for s in [segmenter.flush()] if s is not None]


def test_semantic_segments_find_the_scene_cuts(gqa_model):
    frames, cuts = scenes_video([5, 7, 4, 9, 6])
    segments = segments_of(gqa_model, frames, min_frames=3, max_frames=16, threshold=0.99)
    assert [s.frames for s in segments] == cuts


def test_semantic_segments_respect_min_and_max(gqa_model):
    frames, _ = scenes_video([2, 20, 5])
    segments = segments_of(gqa_model, frames, min_frames=4, max_frames=6, threshold=0.99)
    assert segments[0].frames[1] - segments[0].frames[0] >= 4  # the 2-frame scene cannot stand alone
    assert all(len(s.items) <= 6 for s in segments)
    long = [s for s in segments if s.frames[1] - s.frames[0] > 6]
    assert long and all(any(i.frames[1] - i.frames[0] > 1 for i in s.items) for s in long)  # merged
    assert [f for s in segments for i in s.items for f in range(*i.frames)] == list(range(27))


def test_segments_survive_a_flush_at_question_time(gqa_model):
    frames, _ = scenes_video([6, 6])
    session = StreamSession(gqa_model, method="streamkv", min_frames=2, max_frames=16, keep_ratio=1.0)
    session.add_frames(frames[:3])
    session.ask("what color was the star?", max_new_tokens=2)
    session.add_frames(frames[3:])
    session.flush()
    segments = sorted({(u.segment, u.frames) for u in session.store.units.values() if u.kind == "summary"})
    assert [frames for _, frames in segments] == [(0, 3), (3, 6), (6, 12)]


# ---- guidance compression -------------------------------------------------------------------
def test_guidance_keeps_keep_ratio_of_frames_plus_summaries(gqa_model):
    frames, _ = scenes_video([10, 10])
    session = StreamSession(gqa_model, method="streamkv", keep_ratio=0.4, adaptive=False, min_frames=4)
    session.add_frames(frames)
    session.flush()
    for blocks in session.store.blocks:
        kinds = [session.store.units[u].kind for u in blocks.uids]
        assert kinds.count("summary") == 2 and kinds.count("frame") == 2 * 4  # 40% of 10, twice
    per_layer = [tuple(b.uids) for b in session.store.blocks]
    assert len(set(per_layer)) > 1  # layers keep different frames


# ---- VSB ----------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 300), budget=st.integers(1, 120), bucket=st.integers(1, 4),
       ratio=st.floats(0.01, 1.0), seed=st.integers(0, 999))
def test_vsb_keeps_exactly_m_in_time_order_with_bucket_room(n, budget, bucket, ratio, seed):
    scores = torch.rand(n, generator=torch.Generator().manual_seed(seed))
    kept = vsb_select(scores, budget, ratio, bucket)
    assert kept.numel() == min(n, budget)
    assert torch.all(kept[1:] > kept[:-1])  # time order
    if n > budget:
        top = max(1, min(budget, int(ratio * budget)))
        phase1 = set(scores.argsort(descending=True, stable=True)[:top].tolist())
        n_buckets = math.ceil(budget / bucket)
        fill = [0] * n_buckets
        for i in phase1:
            fill[i * n_buckets // n] += 1
        for i in kept.tolist():
            if i not in phase1:  # phase 2 only adds to buckets with room
                fill[i * n_buckets // n] += 1
                assert fill[i * n_buckets // n] <= bucket


def test_livevlm_long_term_is_exactly_m_tokens_per_layer(gqa_model):
    frames = np.random.default_rng(7).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    session = StreamSession(gqa_model, method="livevlm", budget_tokens=50, n_local=20, vsb_queries=8)
    sinks_before = [k.clone() for k, _ in session.store.sinks]
    session.add_frames(frames)
    for pool in session.store.pools:
        assert len(pool) == 50 and torch.all(pool.positions[1:] > pool.positions[:-1])
    assert all(torch.equal(a, k) for a, (k, _) in zip(sinks_before, session.store.sinks))


# ---- memory accounting ----------------------------------------------------------------------
def test_memory_equals_the_sum_of_stored_tensor_sizes(gqa_model):
    dims = gqa_model.dims
    frames = np.random.default_rng(8).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    block = 2 * dims.kv_heads * dims.tokens_per_frame * dims.head_dim * 4  # keys + values, fp32
    rep = dims.kv_heads * dims.head_dim * 4

    rekv = StreamSession(gqa_model, method="rekv", n_local=None)
    rekv.add_frames(frames)
    rekv.flush()
    memory, sinks = rekv.memory(), rekv.store.sinks[0][0].shape[1]
    assert memory["sinks"] == dims.layers * 2 * dims.kv_heads * sinks * dims.head_dim * 4
    assert memory["blocks"] == dims.layers * 20 * block and memory["window"] == 0
    assert memory["index"] == sum(b._reps.shape[0] for b in rekv.store.blocks) * rep
    assert memory["total"] == memory["sinks"] + memory["blocks"] + memory["index"]

    recent = StreamSession(gqa_model, method="recent", recent_blocks=5)
    recent.add_frames(frames)
    assert recent.memory()["blocks"] == dims.layers * 5 * block and recent.memory()["window"] == 0

    livevlm = StreamSession(gqa_model, method="livevlm", budget_tokens=30, n_local=16, vsb_queries=4)
    livevlm.add_frames(frames)
    window_tokens = livevlm.store.window.tokens
    memory = livevlm.memory()
    assert memory["long_term"] == dims.layers * 2 * dims.kv_heads * 30 * dims.head_dim * 4
    assert memory["window"] == dims.layers * 2 * dims.kv_heads * window_tokens * dims.head_dim * 4


# ---- replicas -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method, options",
    [
        ("rekv", {"top_k": 4, "n_local": 32}),
        ("streamkv", {"keep_ratio": 0.4, "top_k": 4, "min_frames": 3, "n_local": 32}),
        ("livevlm", {"budget_tokens": 40, "n_local": 16, "vsb_queries": 4, "page_tokens": 4}),
        ("recent", {"recent_blocks": 4}),
        ("uniform", {"top_k": 5}),
    ],
)
def test_a_replica_applying_the_same_updates_answers_the_same(gqa_model, method, options):
    """What the actors rely on: memory is a function of the update sequence, no model needed."""
    frames, _ = scenes_video([6, 5, 7, 4])
    session = StreamSession(gqa_model, method=method, **options)
    replica = StreamMemory(gqa_model.dims, session.config, session.store.sinks)
    for update in stream_updates(session, frames):
        replica.apply(update)
    assert replica.memory() == session.store.memory()
    a = session.answerer.ask(session.store, "what color was the star?", max_new_tokens=5)
    b = session.answerer.ask(replica, "what color was the star?", max_new_tokens=5)
    assert a.token_ids == b.token_ids and a.evidence == b.evidence
