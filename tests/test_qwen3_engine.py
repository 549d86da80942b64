"""Qwen3-VL in the engine: with nothing dropped and everything retrieved it is transformers' own
model (timestamps written as text before each temporal patch, interleaved M-RoPE, deepstack),
however the frames are chunked; units vary in length with their timestamps; every preset runs on
it within its memory bounds."""

import numpy as np
import pytest
import torch

from pipeline import StreamSession
from pipeline.config import PRESETS, frame_scaled_options
from pipeline.kv_store import Visual
from tests import test_engine_exactness as exactness
from tests.test_engine_exactness import stream
from tests.test_qwen_engine import FPS, QUESTION, SYSTEM, assert_matches, frames_for

_references: dict = {}


def reference(checkpoint_dir, frames, fps=FPS, indices=None, max_new_tokens=10):
    """transformers' forward/generate on the whole video, its frames taken at `indices` of a
    video sampled at `fps` (the processor writes their timestamps from these), frames as given
    (already at the model's size: do_resize=False)."""
    indices = list(range(len(frames))) if indices is None else indices
    key = (checkpoint_dir, frames.tobytes(), fps, tuple(indices))
    if key not in _references:
        metadata = {"fps": fps, "total_num_frames": indices[-1] + 1, "frames_indices": indices}
        _references[key] = exactness.reference(checkpoint_dir, frames, QUESTION, SYSTEM, max_new_tokens,
                                                video_metadata=[metadata], do_sample_frames=False, do_resize=False)
    return _references[key]


# 9 frames: 4 temporal patches and a lone last frame the question pads; odd chunks split patches
@pytest.mark.parametrize("name,chunks", [("qwen3-gqa", [9]), ("qwen3-gqa", [1, 3, 2, 3]), ("qwen3-gqa", [4, 1, 1, 3]),
                                         ("qwen3-mha", [3, 3, 3]), ("qwen3-mha", [1, 1, 7])])
def test_full_matches_transformers(qwen3_dirs, name, chunks):
    from pipeline import load_model

    model = load_model(qwen3_dirs[name])
    frames = frames_for(model)
    session = StreamSession(model, method="full", segment_frames=2, system_prompt=SYSTEM)
    stream(session, frames, chunks)
    assert_matches(session.ask(QUESTION, max_new_tokens=10), *reference(qwen3_dirs[name], frames))
    # each unit: "<t seconds>" text, <|vision_start|>, visual tokens, <|vision_end|>; 13.0 and 16.0
    # seconds take one digit more than 1.0, 5.0 and 9.0
    n = model.dims.tokens_per_unit
    assert [u.tokens - n for u in session.store.units.values()] == [2 + 6, 2 + 6, 2 + 6, 2 + 7, 2 + 7]


def test_rekv_with_every_block_retrieved_matches_transformers(qwen3_dirs, qwen3_model):
    frames = frames_for(qwen3_model, 9, seed=1)
    session = StreamSession(qwen3_model, method="rekv", top_k=5, n_local=None, segment_frames=3, system_prompt=SYSTEM)
    stream(session, frames, [5, 4])
    answer = session.ask(QUESTION, max_new_tokens=10)
    assert_matches(answer, *reference(qwen3_dirs[qwen3_model.name], frames))
    assert [e.frames for e in answer.evidence] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9)]


def test_timestamps_follow_the_frame_rate(qwen3_dirs, qwen3_model):
    """A stream sampled at 2 fps is transformers' model on the video at 2 fps: other timestamps."""
    frames = frames_for(qwen3_model, 6, seed=2)
    session = StreamSession(qwen3_model, method="full", frame_rate=2.0, system_prompt=SYSTEM)
    stream(session, frames, [6])
    answer = session.ask(QUESTION, max_new_tokens=10)
    assert_matches(answer, *reference(qwen3_dirs[qwen3_model.name], frames, fps=2.0))
    slow_logits, _ = reference(qwen3_dirs[qwen3_model.name], frames, fps=FPS)
    assert not torch.allclose(answer.first_token_logits, slow_logits, rtol=1e-4, atol=1e-5)


def test_uniform_baseline_is_the_base_model_on_sampled_patches(qwen3_dirs, qwen3_model):
    """The baseline samples temporal patches, each with its own timestamp: the base model on
    those frames at their places in the stream."""
    frames = frames_for(qwen3_model, 8, seed=5)  # 4 patches; top_k 2 picks the first and the last
    session = StreamSession(qwen3_model, method="uniform", top_k=2, system_prompt=SYSTEM)
    stream(session, frames, [3, 5])
    answer = session.ask(QUESTION, max_new_tokens=10)
    assert_matches(answer, *reference(qwen3_dirs[qwen3_model.name], frames[[0, 1, 6, 7]], indices=[0, 1, 6, 7]))
    assert [e.frames for e in answer.evidence] == [(0, 2), (6, 8)]


def test_retrieved_units_sit_contiguously_in_order_with_their_own_layout(qwen3_model):
    """Units 1, 4 and 7 (of different timestamp lengths) retrieved after 5 sink tokens: each starts
    where the previous one ends and keeps its own relative (t, h, w); text resumes after them."""
    rope, n, d = qwen3_model.rope(FPS), qwen3_model.dims.tokens_per_unit, qwen3_model.dims.head_dim
    side, h = qwen3_model.side, qwen3_model.dims.kv_heads
    lengths = {1: n + 8, 4: n + 9, 7: n + 10}  # prefixes 7, 8, 9 text tokens
    sinks = (torch.zeros(h, 5, d),) * 2
    parts = [sinks, *(Visual(torch.zeros(h, lengths[u], d), torch.zeros(h, lengths[u], d), u) for u in lengths)]
    placed = rope.place(parts, 3)
    start, offset = 5, 5
    for uid, length in lengths.items():
        prefix = length - n - 1
        unit = placed.context[:, offset : offset + length]
        assert torch.equal(unit[:, :prefix], torch.arange(start, start + prefix).expand(3, -1))  # its timestamp text
        visual = unit[:, prefix : prefix + n] - start - prefix
        assert (visual[0] == 0).all()  # one time for the whole patch, after its text
        assert sorted(map(tuple, visual[1:].T.tolist())) == [(r, c) for r in range(side) for c in range(side)]
        assert (unit[:, -1] == start + prefix + side).all()  # <|vision_end|>
        start, offset = start + prefix + side + 1, offset + length
    assert torch.equal(placed.new, torch.arange(start, start + 3).expand(3, -1))
    assert placed.next == start + 3


def test_long_term_tokens_keep_their_place_in_their_unit(qwen3_model):
    """LiveVLM's long-term memory keeps single tokens of many units (timestamp text included):
    placed, each keeps its place in its unit, and each unit present spans its whole width."""
    n = qwen3_model.dims.tokens_per_unit
    session = StreamSession(qwen3_model, method="livevlm", n_local=2 * n, budget_tokens=3 * n, page_tokens=4,
                            vsb_queries=4)
    session.add_frames(frames_for(qwen3_model, 16, seed=6))
    session.flush()
    memory, rope = session.store, qwen3_model.rope(FPS)
    pool, sinks = memory.pools[0], memory.sinks[0][0].shape[1]
    assert len(pool) == 3 * n and len(torch.unique(pool.uids)) > 3  # tokens dropped across units
    placed = rope.place(memory.ingest_context(0), 0).context[:, sinks : sinks + len(pool)]
    units = [memory.units[int(u)] for u in torch.unique(pool.uids)]
    starts = dict(zip([u.uid for u in units], np.cumsum([0] + [u.tokens - n - 1 + qwen3_model.side + 1 for u in units])))
    for i in range(len(pool)):
        unit = memory.units[int(pool.uids[i])]
        offset, prefix = int(pool.positions[i]) - unit.first_position, unit.tokens - n - 1
        expected = rope.layout(prefix)[:, offset] + sinks + starts[unit.uid]
        assert torch.equal(placed[:, i], expected)


_full_sessions: dict = {}


@pytest.mark.parametrize("method", sorted(PRESETS))
def test_every_preset_runs_within_its_memory_bound(qwen3_model, method):
    dims = qwen3_model.dims
    options = frame_scaled_options(method, dims.tokens_per_frame, dims.frames_per_unit)
    unit = dims.tokens_per_unit + 10  # a unit's tokens with its timestamp text, at most
    small = {  # small enough that 40 frames (20 units) overflow each method's budget
        "recent": {"recent_blocks": 4},
        "rekv": {"top_k": 4, "n_local": 4 * unit},
        "streamkv": {"top_k": 4, "n_local": 4 * unit, "recent_blocks": 2},
        "livevlm": {"n_local": 2 * unit, "budget_tokens": 3 * dims.tokens_per_unit, "page_tokens": 4},
        "uniform": {"top_k": 4},
    }.get(method, {})
    session = StreamSession(qwen3_model, method=method, **{**options, **small})
    frames = frames_for(qwen3_model, 41, seed=4)
    stream(session, frames, [16, 16, 9])
    if qwen3_model.name not in _full_sessions:  # everything retained, for comparison (once per model)
        full = _full_sessions[qwen3_model.name] = StreamSession(qwen3_model, method="full")
        stream(full, frames, [16, 16, 9])
        full.flush()
    full = _full_sessions[qwen3_model.name]
    answer = session.ask(QUESTION, max_new_tokens=6)
    assert answer.token_ids and answer.evidence
    memory, everything = session.memory(), full.memory()
    token_bytes = 2 * dims.layers * dims.kv_heads * dims.head_dim * 4
    stored = sum(u.tokens for u in full.store.units.values())
    if method == "recent":
        assert len(session.store.blocks[0]) == len(session.store.window.entries) == 4
        assert memory["blocks"] + memory["window"] <= 2 * 4 * unit * token_bytes  # its 4 blocks, shared by window
    if method == "streamkv":
        assert memory["blocks"] < 0.75 * everything["blocks"]
    if method == "livevlm":
        assert all(len(pool) <= 3 * dims.tokens_per_unit for pool in session.store.pools)
        assert memory["total"] < 0.6 * everything["total"]
    if method in ("full", "rekv"):
        assert len(full.store.units) == 21  # 20 patches and a padded lone frame
        assert memory["blocks"] == everything["blocks"] == stored * token_bytes
