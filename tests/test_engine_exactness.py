"""The engine with nothing compressed and everything retrieved is transformers' own model."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from pipeline import StreamSession

SYSTEM = "You are a helpful assistant."
QUESTION = "What color was the star?"


def reference(checkpoint_dir, frames, question=QUESTION, system=SYSTEM, max_new_tokens=10, **video_kwargs):
    """First-token logits and greedy tokens of transformers' forward/generate on the whole video
    (`video_kwargs`: further processor arguments, such as Qwen-VL's video_metadata)."""
    processor = AutoProcessor.from_pretrained(checkpoint_dir)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint_dir).eval()
    messages = [
        {"role": "system", "content": [{"type": "text", "text": system}]},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=text, videos=[frames], return_tensors="pt", **video_kwargs)
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
        tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[0]
    return logits, tokens[inputs["input_ids"].shape[1] :].tolist()


def stream(session, frames, chunks):
    assert sum(chunks) == len(frames)
    start = 0
    for size in chunks:
        session.add_frames(frames[start : start + size])
        start += size


@pytest.fixture(scope="module")
def frames():
    # 40x56 frames: the processor must resize them to the checkpoint's square input
    return np.random.default_rng(0).integers(0, 256, (9, 40, 56, 3), dtype=np.uint8)


@pytest.mark.parametrize("chunks", [[9], [1, 3, 2, 3], [4, 1, 1, 3]])
@pytest.mark.parametrize("name", ["gqa", "mha"])
def test_full_matches_transformers(checkpoint_dirs, name, frames, chunks):
    from pipeline import load_model

    ref_logits, ref_tokens = reference(checkpoint_dirs[name], frames)
    session = StreamSession(load_model(checkpoint_dirs[name]), method="full", segment_frames=2, system_prompt=SYSTEM)
    stream(session, frames, chunks)
    answer = session.ask(QUESTION, max_new_tokens=10)
    relative = (answer.first_token_logits - ref_logits).abs().max() / ref_logits.abs().max()
    assert relative <= 1e-4
    assert answer.token_ids == ref_tokens
    assert len(set(ref_tokens)) > 1  # the reference is not degenerate, so equality means something


def test_rekv_with_every_block_retrieved_equals_full(tiny_model, frames):
    full = StreamSession(tiny_model, method="full", segment_frames=3)
    rekv = StreamSession(tiny_model, method="rekv", top_k=len(frames), n_local=None)
    for session in (full, rekv):
        stream(session, frames, [5, 4])
    a, b = full.ask(QUESTION, max_new_tokens=8), rekv.ask(QUESTION, max_new_tokens=8)
    assert torch.allclose(a.first_token_logits, b.first_token_logits, rtol=1e-4, atol=1e-5)
    assert a.token_ids == b.token_ids
    assert {e.frames for e in b.evidence} == {(i, i + 1) for i in range(len(frames))}


def test_asking_does_not_change_the_stream(tiny_model, frames):
    session = StreamSession(tiny_model, method="rekv", top_k=3)
    session.add_frames(frames)
    first = session.ask(QUESTION, max_new_tokens=6)
    memory = session.memory()
    session.ask("which shape was red?", max_new_tokens=6)
    again = session.ask(QUESTION, max_new_tokens=6)
    assert again.token_ids == first.token_ids and session.memory() == memory


def test_ask_stream_yields_the_answer_text(tiny_model, frames):
    session = StreamSession(tiny_model, method="rekv", top_k=4)
    session.add_frames(frames)
    pieces = list(session.ask_stream(QUESTION, max_new_tokens=8))
    assert "".join(pieces) == session.ask(QUESTION, max_new_tokens=8).text
    assert len(pieces) >= 1


def test_uniform_baseline_is_the_base_model_on_sampled_frames(checkpoint_dirs, frames):
    from pipeline import load_model

    session = StreamSession(load_model(checkpoint_dirs["gqa"]), method="uniform", top_k=4, system_prompt=SYSTEM)
    stream(session, frames, [2, 7])
    answer = session.ask(QUESTION, max_new_tokens=10)
    picks = [0, 3, 5, 8]  # 4 frames spread uniformly over 9
    ref_logits, ref_tokens = reference(checkpoint_dirs["gqa"], frames[picks])
    assert torch.allclose(answer.first_token_logits, ref_logits, rtol=1e-4, atol=1e-5)
    assert answer.token_ids == ref_tokens
    assert [e.frames for e in answer.evidence] == [(p, p + 1) for p in picks]
    assert session.memory()["features"] > 0 and session.memory()["blocks"] == 0
