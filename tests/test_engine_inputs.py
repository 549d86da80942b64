"""Bad input gets a clear typed error and the session stays usable; configs are validated."""

import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from pipeline import (
    ConfigError,
    InvalidInputError,
    NoFramesError,
    StreamSession,
    UnsupportedModelError,
    load_model,
    make_config,
)

GOOD = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)


@pytest.fixture
def session(gqa_model):
    return StreamSession(gqa_model, method="rekv", top_k=2)


def test_question_before_any_frame(session):
    with pytest.raises(NoFramesError):
        session.ask("what color was the star?")
    session.add_frames(GOOD)
    assert session.ask("what color was the star?", max_new_tokens=2).token_ids


@pytest.mark.parametrize(
    "frames",
    [
        GOOD.astype(np.float32),  # wrong dtype
        GOOD[0],  # one frame without the T axis
        GOOD[..., :2],  # two channels
        np.zeros((0, 32, 32, 3), np.uint8),  # empty
        [[1, 2, 3]],  # not an array
    ],
)
def test_bad_frames_are_rejected_and_nothing_is_lost(session, frames):
    session.add_frames(GOOD)
    before = session.memory(), session.frames_seen
    with pytest.raises(InvalidInputError):
        session.add_frames(frames)
    assert (session.memory(), session.frames_seen) == before
    session.add_frames(GOOD)
    assert session.frames_seen == 8 and session.ask("what color was the star?", max_new_tokens=2).token_ids


@pytest.mark.parametrize("timestamps", [[0.0, 1.0, 1.0, 2.0], [0, 1, 2], [0, 1, float("nan"), 3]])
def test_bad_timestamps(session, timestamps):
    with pytest.raises(InvalidInputError):
        session.add_frames(GOOD, timestamps=timestamps)
    session.add_frames(GOOD, timestamps=[0.5, 1.0, 1.5, 2.0])
    with pytest.raises(InvalidInputError):  # time must move forward across calls
        session.add_frames(GOOD, timestamps=[2.0, 3.0, 4.0, 5.0])


def test_tensor_frames_are_accepted(session):
    assert session.add_frames(torch.from_numpy(GOOD)) == 4


@pytest.mark.parametrize("question", ["", "   ", None, "star " * 300])
def test_bad_questions(session, question):
    session.add_frames(GOOD)
    with pytest.raises(InvalidInputError):
        session.ask(question)
    assert session.ask("what color was the star?", max_new_tokens=2).token_ids


def test_bad_max_new_tokens(session):
    session.add_frames(GOOD)
    for bad in (0, -1, 10**6, 2.5):
        with pytest.raises(InvalidInputError):
            session.ask("what color?", max_new_tokens=bad)


def test_a_checkpoint_that_is_not_llava_onevision(tmp_path):
    Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "qwen")
    with pytest.raises(UnsupportedModelError, match="qwen2"):
        load_model(tmp_path / "qwen")
    with pytest.raises(UnsupportedModelError):
        load_model(tmp_path / "missing")


@pytest.mark.parametrize(
    "method, options",
    [
        ("nonsense", {}),
        ("rekv", {"topk": 3}),  # unknown knob
        ("rekv", {"top_k": 0}),
        ("streamkv", {"keep_ratio": 0.0}),
        ("streamkv", {"keep_ratio": 1.5}),
        ("rekv", {"segmentation": "scenes"}),
        ("rekv", {"retrieval": "page"}),  # pages need VSB's long-term memory
        ("livevlm", {"budget_tokens": None}),
        ("livevlm", {"retrieval": "block_mean"}),
        ("streamkv", {"min_frames": 10, "max_frames": 4}),
        ("recent", {"recent_blocks": 0}),
        ("rekv", {"n_local": 0}),
    ],
)
def test_impossible_configs(method, options):
    with pytest.raises(ConfigError):
        make_config(method, **options)


def test_presets_follow_the_papers():
    rekv, streamkv, livevlm = make_config("rekv"), make_config("streamkv"), make_config("livevlm")
    assert (rekv.retrieval, rekv.top_k, rekv.n_local) == ("block_mean", 64, 15000)
    assert (streamkv.segmentation, streamkv.compression, streamkv.keep_ratio) == ("semantic", "guidance", 0.4)
    assert (streamkv.min_frames, streamkv.max_frames, streamkv.threshold, streamkv.recent_blocks) == (4, 64, 0.99, 8)
    assert streamkv.adaptive and streamkv.summaries
    assert (livevlm.compression, livevlm.budget_tokens, livevlm.page_ratio, livevlm.page_tokens) == ("vsb", 12000, 0.4, 16)
    assert make_config("streamkv", keep_ratio=0.2).keep_ratio == 0.2
