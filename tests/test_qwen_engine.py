"""Qwen2.5-VL in the engine: with nothing dropped and everything retrieved it is transformers' own
model (M-RoPE positions, temporal patches of 2 frames, time spaced by the frame rate), however the
frames are chunked; every preset runs on it within its memory bounds."""

import numpy as np
import pytest
import torch

from pipeline import StreamSession
from pipeline.config import PRESETS, frame_scaled_options
from tests import test_engine_exactness as exactness
from tests.test_engine_exactness import stream

SYSTEM = "You are a helpful assistant."
QUESTION = "What color was the star?"
FPS = 0.5  # the engine's default frame_rate


def reference(checkpoint_dir, frames, question=QUESTION, fps=FPS, max_new_tokens=10):
    """transformers' forward/generate on the whole video, sampled at `fps`."""
    return exactness.reference(checkpoint_dir, frames, question, SYSTEM, max_new_tokens,
                               video_metadata=[{"fps": fps, "total_num_frames": len(frames)}])


def frames_for(model, count=9, seed=0):
    side = model.frame_size
    return np.random.default_rng(seed).integers(0, 256, (count, side, side, 3), dtype=np.uint8)


def assert_matches(answer, ref_logits, ref_tokens):
    relative = (answer.first_token_logits - ref_logits).abs().max() / ref_logits.abs().max()
    assert relative <= 1e-4
    assert answer.token_ids == ref_tokens
    assert len(set(ref_tokens)) > 1  # the reference is not degenerate, so equality means something


# 9 frames: 4 temporal patches and a lone last frame the question pads; odd chunks split patches
@pytest.mark.parametrize("chunks", [[9], [1, 3, 2, 3], [4, 1, 1, 3], [3, 3, 3]])
@pytest.mark.parametrize("name", ["qwen-gqa", "qwen-mha"])
def test_full_matches_transformers(qwen_dirs, name, chunks):
    from pipeline import load_model

    model = load_model(qwen_dirs[name])
    frames = frames_for(model)
    session = StreamSession(model, method="full", segment_frames=2, system_prompt=SYSTEM)
    stream(session, frames, chunks)
    assert_matches(session.ask(QUESTION, max_new_tokens=10), *reference(qwen_dirs[name], frames))


@pytest.mark.parametrize("count", [8, 9])
def test_rekv_with_every_block_retrieved_matches_transformers(qwen_dirs, qwen_model, count):
    frames = frames_for(qwen_model, count, seed=1)
    units = (count + 1) // 2
    session = StreamSession(qwen_model, method="rekv", top_k=units, n_local=None, segment_frames=3, system_prompt=SYSTEM)
    stream(session, frames, [5, count - 5])
    answer = session.ask(QUESTION, max_new_tokens=10)
    assert_matches(answer, *reference(qwen_dirs[qwen_model.name], frames))
    # evidence is in frames: each temporal patch covers two (the padded lone last frame, one)
    assert [e.frames for e in answer.evidence] == [(2 * i, min(2 * i + 2, count)) for i in range(units)]


def test_time_is_spaced_by_the_frame_rate(qwen_dirs, qwen_model):
    """A stream sampled at 2 fps is transformers' model on the video at 2 fps, not at 0.5."""
    frames = frames_for(qwen_model, 6, seed=2)
    session = StreamSession(qwen_model, method="full", frame_rate=2.0, system_prompt=SYSTEM)
    stream(session, frames, [6])
    answer = session.ask(QUESTION, max_new_tokens=10)
    ref_logits, ref_tokens = reference(qwen_dirs[qwen_model.name], frames, fps=2.0)
    assert_matches(answer, ref_logits, ref_tokens)
    slow_logits, _ = reference(qwen_dirs[qwen_model.name], frames, fps=FPS)
    assert not torch.allclose(answer.first_token_logits, slow_logits, rtol=1e-4, atol=1e-5)


def test_frames_of_another_size_are_squared_first(qwen_dirs, qwen_model):
    frames = np.random.default_rng(3).integers(0, 256, (4, 40, 56, 3), dtype=np.uint8)
    session = StreamSession(qwen_model, method="full", system_prompt=SYSTEM)
    session.add_frames(frames)
    squared = qwen_model.prepare_frames(frames)
    assert squared.shape == (4, qwen_model.frame_size, qwen_model.frame_size, 3)
    assert_matches(session.ask(QUESTION, max_new_tokens=10), *reference(qwen_dirs[qwen_model.name], squared))


@pytest.mark.parametrize("method", sorted(PRESETS))
def test_every_preset_runs_within_its_memory_bound(qwen_model, method):
    dims = qwen_model.dims
    options = frame_scaled_options(method, dims.tokens_per_frame)
    small = {  # small enough that 40 frames (20 units) overflow each method's budget
        "recent": {"recent_blocks": 4},
        "rekv": {"top_k": 4, "n_local": 4 * dims.tokens_per_unit},
        "streamkv": {"top_k": 4, "n_local": 4 * dims.tokens_per_unit, "recent_blocks": 2},
        "livevlm": {"n_local": 2 * dims.tokens_per_unit, "budget_tokens": 3 * dims.tokens_per_unit, "page_tokens": 4},
        "uniform": {"top_k": 4},
    }.get(method, {})
    session = StreamSession(qwen_model, method=method, **{**options, **small})
    full = StreamSession(qwen_model, method="full")
    frames = frames_for(qwen_model, 41, seed=4)
    for s in (session, full):
        stream(s, frames, [16, 16, 9])
    answer = session.ask(QUESTION, max_new_tokens=6)
    assert answer.token_ids and answer.evidence
    memory, everything = session.memory(), full.ask(QUESTION, max_new_tokens=1) and full.memory()
    unit_bytes = 2 * dims.layers * dims.kv_heads * dims.tokens_per_unit * dims.head_dim * 4
    if method == "recent":
        assert memory["blocks"] + memory["window"] <= 2 * 4 * unit_bytes  # its 4 blocks, shared by window
    if method == "streamkv":
        assert memory["blocks"] < 0.75 * everything["blocks"]
    if method == "livevlm":
        assert all(len(pool) <= 3 * dims.tokens_per_unit for pool in session.store.pools)
        assert memory["total"] < 0.6 * everything["total"]
    if method in ("full", "rekv"):
        assert memory["blocks"] == everything["blocks"] == 21 * unit_bytes  # 20 patches and a padded lone frame


def test_retrieved_units_take_temporal_positions_in_order_and_keep_spatial_ones(qwen_model):
    """Units 1, 4 and 7 retrieved after 5 sink tokens: each takes the time slot of its rank
    (0, 1, 2) in transformers' grid and keeps its own (h, w); text resumes after the video."""
    from pipeline.kv_store import Visual

    rope, n, d = qwen_model.rope(FPS), qwen_model.dims.tokens_per_unit, qwen_model.dims.head_dim
    empty = torch.zeros(qwen_model.dims.kv_heads, n, d)
    sinks = (torch.zeros(qwen_model.dims.kv_heads, 5, d),) * 2
    placed = rope.place([sinks, *(Visual(empty, empty, uid) for uid in (1, 4, 7))], 3)
    everything = rope.place([sinks, *(Visual(empty, empty, uid) for uid in range(8))], 3)
    interval = qwen_model.model.config.vision_config.tokens_per_second * 2 / FPS
    for rank in range(3):
        unit = placed.context[:, 5 + rank * n : 5 + (rank + 1) * n]
        assert (unit[0] == 5 + int(rank * interval)).all()  # time: its rank in the retrieved run
        assert torch.equal(unit[1:], everything.context[1:, 5 + rank * n : 5 + (rank + 1) * n])  # space: its own
        assert len({tuple(p) for p in unit[1:].T.tolist()}) == n  # every token its own (h, w)
    side = round(n**0.5)  # merged tokens per side of the square frame
    assert torch.equal(placed.new, torch.arange(5 + side, 5 + side + 3).expand(3, -1))
    assert placed.next == everything.next == 5 + side + 3


def test_uniform_baseline_is_the_base_model_on_sampled_patches(qwen_dirs, qwen_model):
    """The baseline samples temporal patches: the base model on those patches' frames."""
    frames = frames_for(qwen_model, 8, seed=5)  # 4 patches; top_k 2 picks the first and the last
    session = StreamSession(qwen_model, method="uniform", top_k=2, system_prompt=SYSTEM)
    stream(session, frames, [3, 5])
    answer = session.ask(QUESTION, max_new_tokens=10)
    assert_matches(answer, *reference(qwen_dirs[qwen_model.name], frames[[0, 1, 6, 7]]))
    assert [e.frames for e in answer.evidence] == [(0, 2), (6, 8)]


def test_long_term_tokens_keep_their_place_in_their_patch(qwen_model):
    """LiveVLM's long-term memory keeps single tokens of many patches: placed, each keeps the
    (h, w) of its index in its patch and takes its patch's time slot among those present."""
    n = qwen_model.dims.tokens_per_unit
    session = StreamSession(qwen_model, method="livevlm", n_local=2 * n, budget_tokens=3 * n, page_tokens=4,
                            vsb_queries=4)
    session.add_frames(frames_for(qwen_model, 16, seed=6))
    session.flush()
    memory, rope = session.store, qwen_model.rope(FPS)
    pool, sinks = memory.pools[0], memory.sinks[0][0].shape[1]
    assert len(pool) == 3 * n and len(torch.unique(pool.uids)) > 3  # tokens dropped across patches
    placed = rope.place(memory.ingest_context(0), 0).context[:, sinks : sinks + len(pool)]
    index = (pool.positions - sinks) % n
    assert torch.equal(placed[1:], rope.grid(1)[1:, index] + sinks)
    ranks = torch.unique_consecutive(pool.uids, return_inverse=True)[1]
    interval = qwen_model.model.config.vision_config.tokens_per_second * 2 / FPS
    assert torch.equal(placed[0], sinks + (ranks * interval).long())
