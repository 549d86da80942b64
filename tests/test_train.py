"""The demo model's training objectives: the retrieval loss scores frames exactly as the engine's
retrieval does and teaches a model to rank a question's evidence frames first."""

from __future__ import annotations

import numpy as np
import torch

from synthetic.checkpoint import build_config, build_processor
from synthetic.train import DEMO_SPEC, RetrievalProbe, make_batch, question_spans, retrieval_loss
from synthetic.world import KINDS, WorldConfig


def _setup(seed: int = 0):
    from transformers import LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    spec = DEMO_SPEC
    processor = build_processor(spec)
    model = LlavaOnevisionForConditionalGeneration(build_config(spec, processor.tokenizer))
    probe = RetrievalProbe(model.model.language_model)
    inputs, questions, clips = make_batch(processor, np.random.default_rng(seed), WorldConfig(), 4, 6, KINDS, 3, 0)
    return processor, model, probe, inputs, questions, clips


def test_question_spans_are_the_question_texts():
    processor, _, _, inputs, questions, _ = _setup()
    spans = question_spans(inputs["input_ids"], questions, processor.tokenizer)
    for row, row_questions, row_spans in zip(inputs["input_ids"], questions, spans):
        assert [processor.tokenizer.decode(row[s:e]) for s, e in row_spans] == [q.text for q in row_questions]


def test_retrieval_loss_teaches_the_evidence_ranking():
    """A few steps on the retrieval loss alone lower it (the evidence frames climb the engine's
    block scores); the answer loss is left out so nothing else can explain the drop."""
    processor, model, probe, inputs, questions, clips = _setup()
    spans = question_spans(inputs["input_ids"], questions, processor.tokenizer)

    def loss():
        model(**inputs)
        return retrieval_loss(probe, inputs["input_ids"], questions, clips, spans, model.config.video_token_id,
                              DEMO_SPEC.tokens_per_frame)

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = loss()
    assert torch.isfinite(first) and first > 0
    for _ in range(30):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
    assert loss().item() < 0.5 * first.item()
