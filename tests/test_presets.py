"""Presets mean the same number of frames on every model, and each preset's memory claim holds with
the preset's own values (no test-chosen n_local or budget).

The papers give token-valued knobs (ReKV's 15k-token local window, LiveVLM's M = 12k long-term
tokens, StreamKV's window) for LLaVA-OneVision-7B's 196 tokens per frame; make_config scales them
to the model's tokens per frame, and explicit overrides stay as given.
"""

import numpy as np
import pytest

from pipeline import StreamSession
from pipeline.config import PAPER_TOKENS_PER_FRAME, PRESETS, TOKEN_KNOBS, make_config
from tests.test_engine_strategies import scenes_video


@pytest.mark.parametrize("method", [m for m in PRESETS if any(PRESETS[m].get(k) for k in TOKEN_KNOBS)])
def test_presets_keep_the_same_frames_worth_on_every_model(method):
    paper = make_config(method)  # the papers' unit: 196 tokens per frame
    for tokens_per_frame in (1, 4, 64, 196, 256):
        config = make_config(method, tokens_per_frame)
        for knob in TOKEN_KNOBS:
            if PRESETS[method].get(knob):
                frames_paper = getattr(paper, knob) / PAPER_TOKENS_PER_FRAME
                frames_here = getattr(config, knob) / tokens_per_frame
                assert abs(frames_here - frames_paper) <= 0.5 / tokens_per_frame + 1e-9, (knob, tokens_per_frame)
    assert make_config("rekv").n_local == 15000 and make_config("livevlm").budget_tokens == 12000


def test_block_counts_mean_frames_where_a_block_holds_two():
    """Qwen-VL stores temporal patches of 2 frames: ReKV's top 64 frames are 32 patches there,
    StreamKV's 8 recent frames 4, recent-32 keeps 16 patches."""
    assert (make_config("rekv", 128, 2).top_k, make_config("rekv", 196, 1).top_k) == (32, 64)
    assert make_config("streamkv", 128, 2).recent_blocks == 4 and make_config("recent", 128, 2).recent_blocks == 16
    assert make_config("rekv", 128, 2, top_k=64).top_k == 64  # an override is a count of blocks, as given


def test_explicit_token_overrides_are_taken_as_given(gqa_model):
    assert make_config("rekv", 4, n_local=100).n_local == 100
    assert make_config("livevlm", 4, budget_tokens=7, n_local=9).budget_tokens == 7
    n = gqa_model.dims.tokens_per_frame
    session = StreamSession(gqa_model, method="rekv")
    assert session.config.n_local == round(15000 * n / PAPER_TOKENS_PER_FRAME)  # the preset, scaled
    assert session.store.window.limit == session.config.n_local
    assert StreamSession(gqa_model, method="rekv", n_local=None).config.n_local is None


def _ingest(session, frames, chunk=50):
    for i in range(0, len(frames), chunk):
        session.add_frames(frames[i:i + chunk])
    session.flush()
    return session.memory()


def test_streamkv_preset_retains_under_half_of_full_on_a_long_stream(gqa_model):
    """StreamKV's preset as it is (keep 0.4, adaptive budgets, summaries, its scaled 76-frame local
    window) on a 1,200-frame stream of 20-frame scenes: kept frame blocks are keep_ratio of the
    frames that left the local window, per layer on average; one summary block per segment comes on
    top; the total is under half of full's bytes."""
    frames, _ = scenes_video([20] * 60, seed=3)
    full = _ingest(StreamSession(gqa_model, method="full"), frames)
    session = StreamSession(gqa_model, method="streamkv")
    streamkv = _ingest(session, frames)
    config, store = session.config, session.store
    assert (config.keep_ratio, config.adaptive, config.summaries) == (0.4, True, True)

    kinds = [[store.units[uid].kind for uid in blocks.uids] for blocks in store.blocks]  # per layer
    kept_frames = np.mean([k.count("frame") for k in kinds])
    summaries = {k.count("summary") for k in kinds}
    segments = len({u.segment for u in store.units.values()})
    assert summaries == {segments}  # every segment's summary is kept on every layer
    compressed = sum(u.frames[1] - u.frames[0] for u in store.units.values() if u.kind == "frame")
    assert abs(kept_frames / compressed - config.keep_ratio) < 0.02
    assert streamkv["total"] < 0.5 * full["total"]


def test_livevlm_preset_memory_does_not_grow_with_the_stream(gqa_model):
    """LiveVLM's preset: the long-term memory is exactly M (scaled) tokens per layer and the total
    retained bytes are the same after 400 and 800 frames."""
    frames, _ = scenes_video([20] * 40, seed=4)
    session = StreamSession(gqa_model, method="livevlm")
    at_400 = _ingest(session, frames[:400])
    at_800 = _ingest(session, frames[400:])
    m = session.config.budget_tokens
    assert m == round(12000 * gqa_model.dims.tokens_per_frame / PAPER_TOKENS_PER_FRAME)
    assert all(len(pool) == m for pool in session.store.pools)
    assert session.store.window.tokens <= session.config.n_local
    assert at_800["total"] == at_400["total"]
