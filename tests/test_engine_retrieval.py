"""Retrieval chooses, per layer, exactly the top-scoring blocks; pages are position-agnostic."""

import numpy as np
import pytest
import torch

from pipeline import StreamSession
from pipeline.attention import AnswerPlan
from pipeline.kv_store import TokenPool, mean_key

QUESTION = "which shape was red?"


def direct_retrieval(model, session, question, top_k):
    """The retrieval pass written out with the model's modules and explicit softmax attention.

    Scores follow docs/METHODS.md literally: block mean keys with KV heads expanded to query heads and
    concatenated, dotted with the mean query (heads concatenated).
    """
    dims, lm = model.dims, model.lm
    ids = torch.tensor(model.tokenize(question))
    hidden = lm.embed_tokens(ids)[None]  # [1, T, hidden]
    t = hidden.shape[1]
    chosen = []
    for layer_index, layer in enumerate(lm.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        q = attn.q_proj(x).view(t, dims.q_heads, dims.head_dim).transpose(0, 1)  # [Hq, T, d]
        k = attn.k_proj(x).view(t, dims.kv_heads, dims.head_dim).transpose(0, 1)
        v = attn.v_proj(x).view(t, dims.kv_heads, dims.head_dim).transpose(0, 1)
        blocks = session.store.blocks[layer_index]
        reps = torch.stack([key.mean(dim=1) for key in blocks.keys])  # [U, Hkv, d]
        expanded = reps.repeat_interleave(dims.group, dim=1).flatten(1)  # [U, Hq * d]
        scores = expanded @ q.mean(dim=1).flatten()
        top = sorted(scores.topk(top_k).indices.tolist())
        chosen.append(top)
        sink_k, sink_v = session.store.sinks[layer_index]
        keys = torch.cat([sink_k, *[blocks.keys[i] for i in top], k], dim=1)
        values = torch.cat([sink_v, *[blocks.values[i] for i in top], v], dim=1)
        n = keys.shape[1]
        cos, sin = lm.rotary_emb(keys, torch.arange(n)[None])
        keys = keys * cos + torch.cat([-keys[..., dims.head_dim // 2 :], keys[..., : dims.head_dim // 2]], -1) * sin
        cq, sq = cos[:, n - t :], sin[:, n - t :]
        q = q * cq + torch.cat([-q[..., dims.head_dim // 2 :], q[..., : dims.head_dim // 2]], -1) * sq
        keys, values = keys.repeat_interleave(dims.group, 0), values.repeat_interleave(dims.group, 0)
        logits = q @ keys.transpose(1, 2) * dims.head_dim**-0.5
        causal = torch.arange(n)[None, :] <= torch.arange(n - t, n)[:, None]
        out = logits.masked_fill(~causal, float("-inf")).softmax(-1) @ values  # [Hq, T, d]
        hidden = hidden + attn.o_proj(out.transpose(0, 1).reshape(1, t, -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return chosen


def selection_after(model, frames: int, seed: int, method: str, **options):
    """A session that streamed `frames` random frames, and its retrieval for QUESTION."""
    session = StreamSession(model, method=method, **options)
    session.add_frames(np.random.default_rng(seed).integers(0, 256, (frames, 32, 32, 3), dtype=np.uint8))
    session.flush()
    return session, session.answerer.select(session.store, model.tokenize(QUESTION))


@torch.inference_mode()
def test_rekv_chooses_the_top_scoring_blocks_per_layer(tiny_model):
    session, selection = selection_after(tiny_model, 12, 3, "rekv", top_k=3, n_local=None)
    expected = direct_retrieval(tiny_model, session, QUESTION, top_k=3)
    assert selection.chosen == expected
    assert len({tuple(c) for c in expected}) > 1 or tiny_model.dims.layers == 1  # layers differ


def test_recent_blocks_are_always_retrieved(gqa_model):
    _, selection = selection_after(gqa_model, 16, 4, "rekv", top_k=5, recent_blocks=3)
    for chosen in selection.chosen:
        assert len(chosen) == 5 and chosen[-3:] == [13, 14, 15]


def test_adaptive_retrieval_spends_the_whole_budget(gqa_model):
    _, selection = selection_after(gqa_model, 40, 5, "streamkv", keep_ratio=1.0, top_k=8, min_frames=2, max_frames=8)
    counts = [len(c) for c in selection.chosen]
    assert sum(counts) == 8 * gqa_model.dims.layers
    assert all(4 <= c <= 12 for c in counts)


@torch.inference_mode()
def test_pages_are_repositioned_so_attention_equals_a_direct_computation(gqa_model):
    """LiveVLM PaR: retrieved pages of position-free keys, rotated at contiguous positions."""
    session, selection = selection_after(gqa_model, 30, 6, "livevlm", budget_tokens=48, n_local=16, page_tokens=4,
                                         vsb_queries=4)
    dims = gqa_model.dims
    pool = session.store.pools[0]
    expected_pages = max(1, round(0.4 * len(pool.pages(4))))
    assert len(selection.chosen[0]) == expected_pages
    parts = selection.context(0, session.store.sinks[0])
    ctx_k, ctx_v = torch.cat([k for k, _ in parts], 1), torch.cat([v for _, v in parts], 1)
    pages = [pool.pages(4)[i] for i in selection.chosen[0]]
    page_keys = torch.cat([pool.keys[:, s:e] for s, e in pages], dim=1)
    window_k = torch.cat([k for k, _ in session.store.window.parts(0)], 1)
    assert torch.equal(ctx_k, torch.cat([session.store.sinks[0][0], page_keys, window_k], dim=1))

    rng = torch.Generator().manual_seed(0)
    q = torch.randn(dims.q_heads, 3, dims.head_dim, generator=rng)
    k = torch.randn(dims.kv_heads, 3, dims.head_dim, generator=rng)
    v = torch.randn(dims.kv_heads, 3, dims.head_dim, generator=rng)
    out = AnswerPlan(gqa_model.rope(0.5), [parts], capacity=3).attend(0, q, k, v, gqa_model.scaling)

    keys, values = torch.cat([ctx_k, k], 1), torch.cat([ctx_v, v], 1)
    n = keys.shape[1]
    angles = torch.arange(n)[:, None] * gqa_model.lm.rotary_emb.inv_freq[None]  # [n, d/2]
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)

    def rope(x, rows):
        half = x.shape[-1] // 2
        return x * cos[rows] + torch.cat([-x[..., half:], x[..., :half]], -1) * sin[rows]

    rq, rk = rope(q, slice(n - 3, n)), rope(keys, slice(0, n))
    logits = rq @ rk.repeat_interleave(dims.group, 0).transpose(1, 2) * dims.head_dim**-0.5
    causal = torch.arange(n)[None, :] <= torch.arange(n - 3, n)[:, None]
    direct = logits.masked_fill(~causal, float("-inf")).softmax(-1) @ values.repeat_interleave(dims.group, 0)
    assert torch.allclose(out, direct.transpose(0, 1), atol=1e-5)


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_block_scores_equal_expanded_concatenated_dot_products(similarity):
    from pipeline.retrieval import block_scores

    g = torch.Generator().manual_seed(1)
    reps, query = torch.randn(7, 2, 8, generator=g), torch.randn(6, 8, generator=g)
    expanded = reps.repeat_interleave(3, dim=1).flatten(1)  # [U, Hq * d]
    direct = expanded @ query.flatten()
    if similarity == "cosine":
        direct = direct / (expanded.norm(dim=1) * query.norm())
    assert torch.allclose(block_scores(reps, query, similarity), direct, atol=1e-5)


@pytest.mark.parametrize("n_tokens", [0, 5, 12, 13])
def test_page_representatives_are_each_pages_mean_key(n_tokens):
    pool = TokenPool()
    keys = torch.randn(2, n_tokens, 8, dtype=torch.bfloat16)  # [Hkv, N, d]
    pool.append(keys, torch.zeros_like(keys), first_position=0, uid=0)
    expected = [mean_key(keys[:, s:e]) for s, e in pool.pages(4)]
    reps = pool.page_reps(4)
    assert reps.shape == (len(expected), 2, 8) and reps.dtype == torch.float32
    if expected:
        torch.testing.assert_close(reps, torch.stack(expected))
