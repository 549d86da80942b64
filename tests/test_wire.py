"""Updates and snapshots survive the wire exactly: a replica built from them answers the same."""

import pickle

import numpy as np
import pytest

from cache_store.wire import pack_snapshot, pack_update, unpack_snapshot, unpack_update
from pipeline import StreamSession
from pipeline.memory import StreamMemory
from tests.stages import stream_updates

CASES = [
    ("rekv", {"top_k": 4, "n_local": 32}),
    ("streamkv", {"keep_ratio": 0.4, "top_k": 4, "min_frames": 3, "n_local": 32}),
    ("livevlm", {"budget_tokens": 40, "n_local": 16, "vsb_queries": 4, "page_tokens": 4}),
    ("uniform", {"top_k": 5}),
]


@pytest.mark.parametrize("method, options", CASES)
def test_replicas_from_wire_updates_and_snapshots_answer_the_same(gqa_model, method, options):
    frames = np.random.default_rng(11).integers(0, 256, (22, 32, 32, 3), dtype=np.uint8)
    session = StreamSession(gqa_model, method=method, **options)
    from_updates = StreamMemory(gqa_model.dims, session.config, session.store.sinks)
    for update in stream_updates(session, frames):
        wire = pickle.loads(pickle.dumps(pack_update(update, stream_id="s", model_id="m")))  # as Ray ships it
        from_updates.apply(unpack_update(wire, "cpu", gqa_model.dtype))
    snapshot = pickle.loads(pickle.dumps(pack_snapshot(session.store, stream_id="s", model_id="m")))
    from_snapshot = unpack_snapshot(snapshot, gqa_model.dims, session.config, "cpu", gqa_model.dtype)
    expected = session.answerer.ask(session.store, "what color was the star?", max_new_tokens=5)
    for replica in (from_updates, from_snapshot):
        got = session.answerer.ask(replica, "what color was the star?", max_new_tokens=5)
        assert got.token_ids == expected.token_ids and got.evidence == expected.evidence
    assert from_updates.memory() == session.store.memory()
    assert from_snapshot.memory()["total"] == session.store.memory()["total"]


def test_visual_tokens_travel_in_the_model_dtype():
    """bf16 tokens go as a uint16 view (half float32's bytes) and come back exactly, in bf16 for the
    model or float32 for the segmenter."""
    import torch

    from cache_store.wire import pack_features, unpack_features
    from pipeline.segmenter import FrameFeature

    tokens = torch.randn(3, 4, 8).to(torch.bfloat16)  # [T, n, hidden]
    items = [FrameFeature(tokens[i], (i, i + 1), (float(i), float(i))) for i in range(3)]
    wire = pickle.loads(pickle.dumps(pack_features(items)))  # as Ray ships it
    assert wire.arrays["features"].dtype == np.uint16 and wire.nbytes == tokens.numel() * 2
    for dtype in (torch.bfloat16, torch.float32):
        back = torch.stack([f.tokens for f in unpack_features(wire, "cpu", dtype)])
        assert back.dtype == dtype and torch.equal(back, tokens.to(dtype))
