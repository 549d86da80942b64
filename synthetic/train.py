"""Train the demo LLaVA-OneVision on short clips of the synthetic world.

    python -m synthetic.train --out models/demo --minutes 100 --seed 0 --threads 1

Each training example is a CLIP: a time-ordered subset (1..max_frames frames, contiguous windows,
random subsets and runs of blocks, i.e. what a retrieval method hands the model) of a generated
stream, followed by several question/answer turns about it, all answerable from the clip alone
(`synthetic.world.view_questions`). The input goes through the processor and transformers' own
LlavaOnevisionForConditionalGeneration forward; the loss is on the answer tokens (answer word +
<|im_end|>) only, plus with --retrieval-weight the retrieval loss (`retrieval_loss`: the engine's
own block scores, question query against frame keys, taught to rank each question's evidence
frames first in every layer). The clip length follows a curriculum (short clips first). LR:
linear warm-up then cosine decay; --init continues from a saved checkpoint. The checkpoint (model
+ processor) is saved to --out every --save-minutes, and at the end; the log
(--out/train_log.jsonl) has eval accuracy per question kind on held-out seeds (training streams
use seeds < 10**9, eval streams seeds >= 10**9).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from synthetic.checkpoint import CheckpointSpec, build_config, build_processor
from pipeline.retrieval import block_scores
from synthetic.world import (
    KINDS, SYSTEM_PROMPT, ClipQuestion, WorldConfig, generate_scenes, render_frames, view_questions, vocabulary,
)

EVAL_SEED_BASE = 10**9

DEMO_SPEC = CheckpointSpec(
    image_size=64,
    patch_size=16,  # 4x4 patches -> 2x2 pooled = 4 tokens per frame
    vision_hidden=128,
    vision_layers=3,
    vision_heads=4,
    text_hidden=192,
    text_layers=6,
    text_heads=6,
    text_kv_heads=2,
    text_intermediate=512,
    words=vocabulary(),
    seed=0,
)


def messages_for(questions: list[ClipQuestion], with_answers: bool = True) -> list[dict]:
    msgs = [{"role": "system", "content": SYSTEM_PROMPT}]
    for i, question in enumerate(questions):
        content = [{"type": "video"}, {"type": "text", "text": question.text}] if i == 0 else question.text
        msgs.append({"role": "user", "content": content})
        if with_answers:
            msgs.append({"role": "assistant", "content": question.answer})
    return msgs


def sample_clip(rng: np.random.Generator, seed: int, n_frames: int, world: WorldConfig):
    """A time-ordered subset of n_frames frames of a fresh stream: (frame indices, scenes)."""
    mode = rng.integers(3)
    length = int(rng.integers(max(n_frames, 4), max(n_frames * 6, 40) + 1))
    scenes = generate_scenes(length, seed, world)
    if mode == 0 or n_frames >= length:  # contiguous window
        start = int(rng.integers(0, length - n_frames + 1))
        idx = list(range(start, start + n_frames))
    elif mode == 1:  # uniform random subset
        idx = sorted(rng.choice(length, size=n_frames, replace=False).tolist())
    else:  # a few contiguous runs (what top-k retrieval tends to return)
        chosen: set[int] = set()
        while len(chosen) < n_frames:
            run = int(rng.integers(1, 9))
            s = int(rng.integers(0, length))
            chosen.update(range(s, min(length, s + run)))
        idx = sorted(chosen)[:n_frames] if len(chosen) == n_frames else sorted(rng.choice(sorted(chosen), n_frames, replace=False).tolist())
    starts = [s.start for s in scenes]
    view = [(f, scenes[int(np.searchsorted(starts, f, side="right")) - 1]) for f in idx]
    return idx, scenes, view


def make_batch(processor, rng, world, batch, n_frames, kinds, q_per_clip, seed_base, single=False,
               confusable_world: WorldConfig | None = None, confusable_fraction: float = 0.0):
    """Processor inputs for `batch` clips, each clip's questions, and each clip's frame numbers.
    A `confusable_fraction` of the clips come from `confusable_world` (only shapes the model confuses)."""
    texts, videos, qs_all, clips = [], [], [], []
    while len(texts) < batch:
        seed = int(rng.integers(0, 10**9)) + seed_base
        clip_world = confusable_world if confusable_world is not None and rng.random() < confusable_fraction else world
        idx, scenes, view = sample_clip(rng, seed, n_frames, clip_world)
        qs = view_questions(view, clip_world, rng, kinds, n=1 if single else q_per_clip)
        if not qs:
            continue
        frames = render_frames(scenes, idx, clip_world, seed)
        msgs = messages_for(qs, with_answers=not single)
        texts.append(processor.apply_chat_template(msgs, add_generation_prompt=single, tokenize=False))
        videos.append(frames)
        qs_all.append(qs)
        clips.append(idx)
    inputs = processor(text=texts, videos=videos, return_tensors="pt", padding=True)
    return inputs, qs_all, clips


def answer_labels(input_ids: torch.Tensor, tok) -> torch.Tensor:
    """-100 everywhere except the tokens of each assistant reply (answer + <|im_end|>)."""
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assistant = tok.convert_tokens_to_ids("assistant")
    labels = torch.full_like(input_ids, -100)
    ids = input_ids.tolist()
    for b, row in enumerate(ids):
        i = 0
        while i < len(row) - 2:
            if row[i] == im_start and row[i + 1] == assistant:
                j = i + 3  # skip "<|im_start|> assistant \n"
                while j < len(row) and row[j] != im_end:
                    labels[b, j] = input_ids[b, j]
                    j += 1
                if j < len(row):
                    labels[b, j] = im_end
                i = j
            i += 1
    return labels


class RetrievalProbe:
    """Keeps every decoder layer's pre-RoPE queries and keys ([B, S, heads * d], the q_proj and
    k_proj outputs) of the last forward, for the retrieval loss."""

    def __init__(self, language_model):
        attention = language_model.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.queries: list[torch.Tensor | None] = [None] * len(language_model.layers)
        self.keys: list[torch.Tensor | None] = [None] * len(language_model.layers)
        for i, layer in enumerate(language_model.layers):
            layer.self_attn.q_proj.register_forward_hook(lambda _m, _i, out, i=i: self.queries.__setitem__(i, out))
            layer.self_attn.k_proj.register_forward_hook(lambda _m, _i, out, i=i: self.keys.__setitem__(i, out))


def question_spans(input_ids: torch.Tensor, questions: list[list[ClipQuestion]], tok) -> list[list[tuple[int, int]]]:
    """Per row, the token span [start, end) of each question's text, found in order."""
    spans = []
    for row, row_questions in zip(input_ids.tolist(), questions):
        found, at = [], 0
        for question in row_questions:
            ids = tok(question.text, add_special_tokens=False).input_ids
            while row[at : at + len(ids)] != ids:
                if at + len(ids) > len(row):
                    raise ValueError(f"question {question.text!r} is not in the tokenized prompt")
                at += 1
            found.append((at, at + len(ids)))
            at += len(ids)
        spans.append(found)
    return spans


def retrieval_loss(probe: RetrievalProbe, input_ids, questions, clips, spans, video_token_id: int, tokens_per_frame: int):
    """Cross-entropy of the engine's own block scores (mean question query . mean frame key, per
    layer: pipeline.retrieval.block_scores) against each question's evidence frames.

    A large Video-LLM's attention already finds the frames a question is about, which is what
    ReKV/StreamKV/LiveVLM retrieval relies on; a tiny model trained on short clips never needs to,
    so this teaches it. Questions whose evidence is the whole clip carry no signal and are skipped."""
    terms = []
    d = probe.head_dim
    for b, (row_questions, frames, row_spans) in enumerate(zip(questions, clips, spans)):
        video = (input_ids[b] == video_token_id).nonzero().squeeze(1)[: len(frames) * tokens_per_frame]  # [T * n]
        position = {f: p for p, f in enumerate(frames)}
        asked = [(sorted({position[f] for f in q.evidence}), span) for q, span in zip(row_questions, row_spans)]
        asked = [(evidence, span) for evidence, span in asked if len(evidence) < len(frames)]
        for queries, keys in zip(probe.queries, probe.keys):
            reps = keys[b, video].view(len(frames), tokens_per_frame, -1, d).mean(1)  # [T, Hkv, d]
            for evidence, (start, end) in asked:
                query_mean = queries[b, start:end].mean(0).view(-1, d)  # [Hq, d]
                logits = block_scores(reps, query_mean) / d**0.5  # [T]
                terms.append(torch.logsumexp(logits, 0) - torch.logsumexp(logits[evidence], 0))
    return torch.stack(terms).mean() if terms else torch.zeros(())


@torch.no_grad()
def evaluate(model, processor, world, kinds, n_per_len=64, lens=(1, 8, 16, 32), seed=0, batch=16):
    """Accuracy per kind of the first greedy token (the answer word) on held-out seeds,
    one question per clip, in exactly the deployment prompt format."""
    model.eval()
    tok = processor.tokenizer
    rng = np.random.default_rng([seed, 4242])
    hits: dict[str, list[int]] = {}
    for T in lens:
        for _ in range(max(1, n_per_len // batch)):
            inputs, qs, _ = make_batch(processor, rng, world, batch, T, kinds, 1, EVAL_SEED_BASE, single=True)
            logits = model(**inputs).logits
            last = inputs["attention_mask"].sum(1) - 1
            pred = logits[torch.arange(len(qs)), last].argmax(-1).tolist()
            for p, q in zip(pred, qs):
                kind = q[0].kind
                ok = tok.convert_ids_to_tokens(p) == q[0].answer
                hits.setdefault(kind, []).append(int(ok))
                hits.setdefault(f"T{T}", []).append(int(ok))
    model.train()
    return {k: round(float(np.mean(v)), 4) for k, v in sorted(hits.items())}


@torch.no_grad()
def evaluate_generate(model_dir, n_per_kind=100, lens=(1, 4, 8, 16, 32), seed=7, kinds=KINDS):
    """Accuracy per kind and per clip length with transformers' generate (greedy, one question per
    clip, batch 1) of a saved checkpoint, on held-out seeds."""
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(model_dir, local_files_only=True).eval()
    world = WorldConfig()
    rng = np.random.default_rng([seed, 777])
    hits: dict[str, list[int]] = {}
    for kind in kinds:
        for i in range(n_per_kind):
            T = lens[i % len(lens)]
            if kind == "order" and T == 1:
                T = 2  # "what came right after X" needs at least two frames
            while True:
                s = EVAL_SEED_BASE + int(rng.integers(0, 10**9))
                idx, scenes, view = sample_clip(rng, s, T, world)
                qs = view_questions(view, world, rng, (kind,), n=1)
                if qs:
                    break
            prompt = processor.apply_chat_template(messages_for(qs, with_answers=False), add_generation_prompt=True)
            inputs = processor(text=prompt, videos=[render_frames(scenes, idx, world, s)], return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            reply = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
            ok = int(reply == qs[0].answer)
            hits.setdefault(kind, []).append(ok)
            hits.setdefault(f"T{T}", []).append(ok)
            hits.setdefault(f"{kind}@T{T}", []).append(ok)
            hits.setdefault("all", []).append(ok)
    return {k: (round(float(np.mean(v)), 4), len(v)) for k, v in hits.items()}


def save(model, processor, spec, out: Path, meta: dict):
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "streamkv_spec.json").write_text(json.dumps(asdict(spec), indent=1))
    (tmp / "train_meta.json").write_text(json.dumps(meta, indent=1))
    out.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():  # replace files one by one, keep other files (log, card) in place
        os.replace(f, out / f.name)
    tmp.rmdir()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="models/demo")
    ap.add_argument("--minutes", type=float, default=100.0, help="wall-clock training budget")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: time only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--min-frames", type=int, default=1)
    ap.add_argument("--max-frames", type=int, default=32)
    ap.add_argument("--curriculum", type=float, default=0.5, help="fraction of the budget over which max clip length grows")
    ap.add_argument("--stage1-minutes", type=float, default=0.0, help="first train on 1..stage1-frames frames")
    ap.add_argument("--stage1-frames", type=int, default=1)
    ap.add_argument("--stage1-kinds", default="now,reverse,attribute")
    ap.add_argument("--stage1-q", type=int, default=1, help="questions per clip in stage 1")
    ap.add_argument("--q-per-clip", type=int, default=6)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--eval-every", type=float, default=5.0, help="minutes")
    ap.add_argument("--save-minutes", type=float, default=8.0)
    ap.add_argument("--eval-n", type=int, default=64)
    ap.add_argument("--eval-lens", default="1,8,16,32")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--spec", default="", help="JSON overrides of DEMO_SPEC fields")
    ap.add_argument("--eval-only", default="", help="evaluate a saved checkpoint dir with generate and exit")
    ap.add_argument("--eval-per-kind", type=int, default=100)
    ap.add_argument("--init", default="", help="continue from a saved checkpoint dir (model + processor)")
    ap.add_argument("--retrieval-weight", type=float, default=0.0,
                    help="weight of the retrieval loss (see retrieval_loss); 0 = answers only")
    ap.add_argument("--confusable-shapes", default="",
                    help="comma-separated shapes the model confuses; --confusable-fraction of the clips show only these")
    ap.add_argument("--confusable-fraction", type=float, default=0.0)
    args = ap.parse_args(argv)
    if args.eval_only:
        torch.set_num_threads(args.threads)
        res = evaluate_generate(args.eval_only, args.eval_per_kind)
        print(json.dumps(res, indent=1))
        return res

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    spec = replace(DEMO_SPEC, seed=args.seed, **(json.loads(args.spec) if args.spec else {}))
    world = WorldConfig()
    confusable_world = replace(world, shapes=tuple(args.confusable_shapes.split(","))) if args.confusable_shapes else None
    kinds = tuple(args.kinds.split(","))
    stage1_kinds = tuple(args.stage1_kinds.split(","))
    eval_lens = tuple(int(x) for x in args.eval_lens.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"

    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    if args.init:
        processor = AutoProcessor.from_pretrained(args.init, local_files_only=True)
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(args.init, local_files_only=True)
    else:
        processor = build_processor(spec)
        model = LlavaOnevisionForConditionalGeneration(build_config(spec, processor.tokenizer))
    tok = processor.tokenizer
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    probe = RetrievalProbe(model.model.language_model) if args.retrieval_weight else None
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98),
    )  # fmt: skip
    budget = args.minutes * 60
    t0 = time.time()
    last_eval = last_save = t0
    step = 0
    losses: list[float] = []
    retrieval_losses: list[float] = []
    meta = {"command": "python -m synthetic.train " + " ".join(argv if argv is not None else os.sys.argv[1:]),
            "params": n_params, "spec": asdict(spec), "world": asdict(world)}  # fmt: skip

    def log(rec):
        rec = {"step": step, "min": round((time.time() - t0) / 60, 2), **rec}
        print(json.dumps(rec), flush=True)
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    log({"event": "start", "params": n_params, "tokens_per_frame": spec.tokens_per_frame})
    model.train()
    while True:
        elapsed = time.time() - t0
        frac = elapsed / budget
        if frac >= 1 or (args.max_steps and step >= args.max_steps):
            break
        # curriculum: the longest clip grows from min(4, max) to max over the first `curriculum` of the budget
        # stage 1 (recognition): clips of 1..stage1_frames frames for the first stage1_minutes
        s1 = args.stage1_minutes * 60 / budget
        cfrac = max(0.0, frac - s1) / max(1e-9, 1 - s1)
        cur_max = args.max_frames if args.curriculum <= 0 else int(
            round(min(4, args.max_frames) + (args.max_frames - min(4, args.max_frames)) * min(1.0, cfrac / args.curriculum))
        )  # fmt: skip
        if frac < s1:
            cur_max = args.stage1_frames
        n_frames = int(rng.integers(args.min_frames, max(args.min_frames, cur_max) + 1))
        # LR: warm-up by steps, cosine by time
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))
        for g in opt.param_groups:
            g["lr"] = lr
        in_stage1 = frac < s1
        inputs, batch_questions, clips = make_batch(
            processor, rng, world, args.batch, n_frames, stage1_kinds if in_stage1 else kinds,
            args.stage1_q if in_stage1 else args.q_per_clip, 0, confusable_world=confusable_world,
            confusable_fraction=0.0 if in_stage1 else args.confusable_fraction,
        )  # fmt: skip
        labels = answer_labels(inputs["input_ids"], tok)
        loss = answer_loss = model(**inputs, labels=labels).loss
        if probe is not None:
            spans = question_spans(inputs["input_ids"], batch_questions, tok)
            found = retrieval_loss(probe, inputs["input_ids"], batch_questions, clips, spans, model.config.video_token_id,
                                   spec.tokens_per_frame)  # fmt: skip
            loss = answer_loss + args.retrieval_weight * found
            retrieval_losses.append(found.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(answer_loss.item())
        step += 1
        if step % 25 == 0:
            retrieval = {"retrieval_loss": round(float(np.mean(retrieval_losses[-25:])), 4)} if retrieval_losses else {}
            log({"loss": round(float(np.mean(losses[-25:])), 4), **retrieval, "lr": round(lr, 6), "T": n_frames})
        now = time.time()
        if now - last_eval >= args.eval_every * 60:
            log({"eval": evaluate(model, processor, world, kinds, args.eval_n, eval_lens, seed=1)})
            last_eval = time.time()
        if not args.no_save and now - last_save >= args.save_minutes * 60:
            save(model, processor, spec, out, {**meta, "steps": step, "minutes": round((now - t0) / 60, 2)})
            log({"event": "saved"})
            last_save = time.time()
    final = evaluate(model, processor, world, kinds, args.eval_n, eval_lens, seed=1)
    log({"eval": final, "event": "final"})
    if not args.no_save:
        save(model, processor, spec, out, {**meta, "steps": step, "minutes": round((time.time() - t0) / 60, 2), "final_eval": final})
        log({"event": "saved_final"})


if __name__ == "__main__":
    main()
