"""Long-stream QA benchmark: accuracy, retained KV and latency of every method, in one run.

    python -m bench.qa [--frames 1000] [--streams 10] [--questions 30] [--model models/demo]

Streams come from the synthetic world on held-out seeds (>= 90000, never used in training), each
with questions spread over the stream; each question sees only the frames before it. Every
method streams the same frames and answers the same questions. Token-valued knobs are scaled to
the model's tokens per frame (see pipeline.config.frame_scaled_options); with --context-frames C
every method shows the model about C frames at once: uniform-C, recent-C, top-C retrieval,
LiveVLM sized to C (see context_options); uniform-32 and recent-32 (the issue's baselines) run too.
--readers N...: also the model's accuracy with perfect retrieval (evidence frames + N random
earlier frames), which tells retrieval misses from reading failures.
Accuracies come with 95% intervals from a bootstrap over STREAMS (questions about one stream share
its few needle scenes, so they are not independent), and streamkv's compressed settings with the
paired difference to keep_ratio 1.0 on the same questions.
Writes bench/results/qa.json, qa.md and qa_accuracy_vs_memory.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from pipeline import StreamSession, load_model
from synthetic.demo import DEFAULT_MODEL, context_options, first_word
from synthetic.world import (
    KINDS, SYSTEM_PROMPT, WorldConfig, generate_stream, needle_questions, needle_stream, questions,
)

# (label, preset, overrides)
METHODS: list[tuple[str, str, dict]] = [
    ("full", "full", {}),
    ("uniform", "uniform", {}),
    ("uniform-32", "uniform", {"top_k": 32}),
    ("recent", "recent", {}),
    ("recent-32", "recent", {"recent_blocks": 32}),
    ("rekv", "rekv", {}),
    ("streamkv keep=1.0", "streamkv", {"keep_ratio": 1.0}),
    ("streamkv keep=0.4", "streamkv", {"keep_ratio": 0.4}),
    ("streamkv keep=0.2", "streamkv", {"keep_ratio": 0.2}),
    ("streamkv keep=0.1", "streamkv", {"keep_ratio": 0.1}),
    ("streamkv uniform-seg keep=0.4", "streamkv", {"keep_ratio": 0.4, "segmentation": "uniform"}),
    ("livevlm", "livevlm", {}),
]
HELD_OUT_SEED = 90_000
# (method, reference): paired accuracy differences reported on the same questions
PAIRED = [("streamkv keep=0.4", "streamkv keep=1.0"), ("streamkv keep=0.2", "streamkv keep=1.0"),
          ("streamkv keep=0.1", "streamkv keep=1.0"), ("streamkv uniform-seg keep=0.4", "streamkv keep=1.0"),
          ("rekv", "uniform-32"), ("rekv", "recent-32")]


def stream_bootstrap(values_by_stream: list[list[float]], samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean over all values, resampling whole streams with replacement."""
    rng = np.random.default_rng(seed)
    sums = np.array([sum(v) for v in values_by_stream], dtype=float)
    counts = np.array([len(v) for v in values_by_stream], dtype=float)
    picks = rng.integers(0, len(sums), size=(samples, len(sums)))  # [samples, streams]
    means = sums[picks].sum(axis=1) / np.maximum(counts[picks].sum(axis=1), 1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def run_method(model, preset: str, overrides: dict, streams, asked, context_frames: int | None) -> dict:
    tokens_per_frame = model.dims.tokens_per_frame
    options = {**context_options(preset, context_frames, tokens_per_frame), **overrides}
    records, latencies, ingest_s, frames_total, retained = [], [], 0.0, 0, []
    for stream_index, (stream, stream_questions) in enumerate(zip(streams, asked)):
        session = StreamSession(model, method=preset, system_prompt=SYSTEM_PROMPT, **options)
        done = 0
        for question in stream_questions:
            if question.ask_at > done:
                start = time.perf_counter()
                session.add_frames(stream.frames[done : question.ask_at], timestamps=stream.times[done : question.ask_at])
                ingest_s += time.perf_counter() - start
                frames_total += question.ask_at - done
                done = question.ask_at
            start = time.perf_counter()
            answer = session.ask(question.text, max_new_tokens=4)
            latencies.append(time.perf_counter() - start)
            hit = any(e.frames[0] < end and start_ < e.frames[1] for e in answer.evidence for start_, end in question.evidence)
            records.append({"stream": stream_index, "kind": question.kind,
                            "correct": first_word(answer.text) == question.answer, "evidence_hit": hit})
        retained.append(session.memory()["total"])
    by_kind = defaultdict(list)
    for r in records:
        by_kind[r["kind"]].append(r["correct"])
    latencies.sort()
    return {
        "options": options,
        "accuracy": sum(r["correct"] for r in records) / len(records),
        "accuracy_ci95": stream_bootstrap(by_stream(records, lambda r: r["correct"])),
        "correct": [r["correct"] for r in records],
        "accuracy_by_kind": {k: sum(v) / len(v) for k, v in by_kind.items()},
        "evidence_hit_rate": sum(r["evidence_hit"] for r in records) / len(records),
        "retained_bytes": statistics.mean(retained),
        "latency_p50_s": latencies[len(latencies) // 2],
        "latency_p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        "ingest_fps": frames_total / ingest_s if ingest_s else float("nan"),
        "questions": len(records),
    }


def by_stream(records: list[dict], value) -> list[list[float]]:
    grouped = defaultdict(list)
    for r in records:
        grouped[r["stream"]].append(float(value(r)))
    return [grouped[s] for s in sorted(grouped)]


def paired_differences(methods: dict, streams_of: list[int]) -> list[dict]:
    """Accuracy of a method minus its reference's on the same questions, with a 95% interval."""
    out = []
    for label, reference in PAIRED:
        if label in methods and reference in methods:
            records = [{"stream": s, "d": a - b} for s, a, b in
                       zip(streams_of, methods[label]["correct"], methods[reference]["correct"])]
            out.append({"method": label, "reference": reference,
                        "difference": methods[label]["accuracy"] - methods[reference]["accuracy"],
                        "ci95": stream_bootstrap(by_stream(records, lambda r: r["d"]))})
    return out


def run_reader(model, streams, asked, distractors: int, seed: int = 0) -> dict:
    """How well the model READS when retrieval is perfect: each question answered by the engine
    (`full`) over only its evidence frames, plus `distractors` other frames from before the
    question (time order kept). Separates retrieval misses from reading failures."""
    rng = np.random.default_rng([seed, distractors])
    correct = []
    for stream, stream_questions in zip(streams, asked):
        for question in stream_questions:
            evidence = {f for start, end in question.evidence for f in range(start, end)}
            others = [f for f in range(question.ask_at) if f not in evidence]
            picked = rng.choice(others, size=min(distractors, len(others)), replace=False).tolist()
            frames = sorted(evidence | set(picked))
            session = StreamSession(model, method="full", system_prompt=SYSTEM_PROMPT)
            session.add_frames(stream.frames[frames], timestamps=stream.times[frames])
            correct.append(first_word(session.ask(question.text, max_new_tokens=4).text) == question.answer)
    return {"distractors": distractors, "accuracy": sum(correct) / len(correct), "questions": len(correct)}


def report(results: dict, console: Console) -> str:
    table = Table(title=f"long-stream QA, {results['world']} world ({results['frames']} frames x "
                        f"{results['streams']} streams, {results['questions']} questions)")
    kinds = [k for k in KINDS if any(k in r["accuracy_by_kind"] for r in results["methods"].values())]
    columns = ["method", "accuracy", *kinds, "evidence hit", "retained KV", "p50", "p95", "ingest fps"]
    for column in columns:
        table.add_column(column, justify="right")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for label, r in results["methods"].items():
        low, high = r["accuracy_ci95"]
        row = [label, f"{r['accuracy']:.1%} [{low:.0%}, {high:.0%}]",
               *[f"{r['accuracy_by_kind'].get(k, float('nan')):.0%}" for k in kinds],
               f"{r['evidence_hit_rate']:.0%}", f"{r['retained_bytes'] / 2**20:.2f} MiB",
               f"{r['latency_p50_s'] * 1000:.0f} ms", f"{r['latency_p95_s'] * 1000:.0f} ms", f"{r['ingest_fps']:.1f}"]
        table.add_row(*row)
        lines.append("| " + " | ".join(row) + " |")
    console.print(table)
    paired = results.get("paired", [])
    if paired:
        lines += ["", "Paired differences (same questions; 95% interval over streams):", "",
                  "| method | minus | difference | 95% interval |", "|---|---|---|---|"]
        lines += [f"| {p['method']} | {p['reference']} | {100 * p['difference']:+.1f} pts | "
                  f"[{100 * p['ci95'][0]:+.1f}, {100 * p['ci95'][1]:+.1f}] |" for p in paired]
        console.print("\n".join(lines[-len(paired) - 2 :]))
    readers = results.get("readers", [])
    if readers:
        lines += ["", "Perfect retrieval (the engine's `full` on the evidence frames + N random earlier frames):", "",
                  "| distractor frames | accuracy |", "|---|---|"]
        lines += [f"| {r['distractors']} | {r['accuracy']:.1%} |" for r in readers]
        console.print("\n".join(lines[-len(readers) - 2 :]))
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axis = plt.subplots(figsize=(7, 4.5))
    for label, r in results["methods"].items():
        low, high = (100 * bound for bound in r["accuracy_ci95"])
        accuracy = 100 * r["accuracy"]
        axis.errorbar(r["retained_bytes"] / 2**20, accuracy, yerr=[[accuracy - low], [high - accuracy]],
                      fmt="o", markersize=6, capsize=3)
        axis.annotate(label, (r["retained_bytes"] / 2**20, 100 * r["accuracy"]), fontsize=8,
                      xytext=(4, 3), textcoords="offset points")
    axis.set_xscale("log")
    axis.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axis.set_xlabel("retained KV at the end of the stream (MiB, log)")
    axis.set_ylabel("accuracy (%)")
    axis.set_title(f"accuracy vs memory, {results['frames']}-frame streams ({results['world']} world; "
                   f"95% interval over {results['streams']} streams)", fontsize=10)
    axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--streams", type=int, default=10)
    parser.add_argument("--questions", type=int, default=30, help="per stream")
    parser.add_argument("--world", choices=("needles", "plain"), default="needles",
                        help="needles: rare shapes seen in a few scenes, questions about them; plain: the default world")
    parser.add_argument("--methods", nargs="*", help="labels to run (default: all)")
    parser.add_argument("--context-frames", type=int, default=8,
                        help="frames each method shows the model at once (0: the papers' scaled budgets)")
    parser.add_argument("--readers", type=int, nargs="*", default=[0, 4, 16],
                        help="also measure reading with perfect retrieval: evidence + N distractor frames")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps a shared CPU stable)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    console = Console(stderr=True)
    model = load_model(args.model)
    seeds = [HELD_OUT_SEED + i for i in range(args.streams)]
    if args.world == "needles":
        streams = [needle_stream(args.frames, seed) for seed in seeds]
        asked = [needle_questions(stream, args.questions, seed) for stream, seed in zip(streams, seeds)]
    else:
        streams = [generate_stream(args.frames, seed, WorldConfig()) for seed in seeds]
        asked = [questions(stream, args.questions, seed) for stream, seed in zip(streams, seeds)]
    methods = [m for m in METHODS if not args.methods or m[0] in args.methods]
    results = {"frames": args.frames, "streams": args.streams, "questions": sum(map(len, asked)), "world": args.world,
               "context_frames": args.context_frames,
               "model": str(args.model), "seeds": seeds, "methods": {}}
    with Progress(console=console) as progress:
        task = progress.add_task("methods", total=len(methods))
        for label, preset, overrides in methods:
            progress.update(task, description=label)
            results["methods"][label] = run_method(model, preset, overrides, streams, asked, args.context_frames)
            progress.advance(task)
        streams_of = [s for s, stream_questions in enumerate(asked) for _ in stream_questions]
        results["paired"] = paired_differences(results["methods"], streams_of)
        task = progress.add_task("perfect retrieval", total=len(args.readers))
        for distractors in args.readers:
            results.setdefault("readers", []).append(run_reader(model, streams, asked, distractors))
            progress.advance(task)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "qa.json").write_text(json.dumps(results, indent=1))
    (args.out / "qa.md").write_text(report(results, console))
    plot(results, args.out / "qa_accuracy_vs_memory.png")
    return results


if __name__ == "__main__":
    main()
