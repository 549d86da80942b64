"""Engine benchmark: ingest speed, retained KV and answer latency per method as the stream grows.

    python -m bench.engine [--lengths 256 1024 4096] [--questions 5] [--out bench/results]

One tiny checkpoint, one run, every preset side by side. Each preset streams frames in chunks up
to each length, then answers `--questions` questions (p50 latency). The reference is transformers'
plain incremental forward (vision tower + language model with its own DynamicCache) over the
same frames in the same chunks. Token-valued knobs of the presets (n_local, budget_tokens) are
given by the papers for 196 tokens per frame; they are scaled here to the checkpoint's tokens per
frame, so every method keeps the same number of frames' worth as in the papers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from transformers.cache_utils import DynamicCache

from pipeline import StreamSession, load_model
from pipeline.config import PRESETS, frame_scaled_options
from synthetic.checkpoint import CheckpointSpec, build_checkpoint

QUESTIONS = ["what color was the star?", "which shape was red?", "what is on screen now?", "how many circles?"]
CHUNK = 8  # frames per add_frames call, as a camera feeding 16 s of video at 0.5 fps
BENCH_SPEC = CheckpointSpec(image_size=64, patch_size=8, text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2)


def frames_for(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 64, 64, 3), dtype=np.uint8)


@torch.inference_mode()
def plain_forward_seconds(model, frames: np.ndarray, marks: list[int]) -> dict[int, float]:
    """transformers' own incremental forward over the same frames and chunks: cumulative seconds."""
    lm, cache, out, elapsed = model.lm, DynamicCache(config=model.lm.config), {}, 0.0
    start = time.perf_counter()
    lm(input_ids=torch.tensor([model.prompt_parts("You are a helpful assistant.", "").prefix_ids]), past_key_values=cache, use_cache=True)
    for i in range(0, len(frames), CHUNK):
        embeds = model.encode_frames(frames[i : i + CHUNK]).flatten(0, 1)[None]
        # the plain model has no streaming plan: its attention is ordinary SDPA over the whole cache
        lm(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
        if i + CHUNK in marks:
            elapsed = time.perf_counter() - start
            out[i + CHUNK] = elapsed
    return out


def run(lengths: list[int], questions: int, out_dir: Path) -> dict:
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(build_checkpoint(Path(tmp) / "bench", BENCH_SPEC))
    frames = frames_for(max(lengths))
    presets = {m: frame_scaled_options(m, model.dims.tokens_per_frame) for m in PRESETS}
    results: dict = {"tokens_per_frame": model.dims.tokens_per_frame, "presets": presets, "methods": {}}
    with Progress(console=console) as progress:
        task = progress.add_task("plain forward", total=max(lengths))
        plain = plain_forward_seconds(model, frames, lengths)
        progress.update(task, completed=max(lengths))
        results["plain_seconds"] = plain
        for method, options in presets.items():
            task = progress.add_task(method, total=max(lengths))
            session = StreamSession(model, method=method, **options)
            ingest, rows, done = 0.0, {}, 0
            for length in lengths:
                while done < length:
                    t0 = time.perf_counter()
                    session.add_frames(frames[done : done + CHUNK])
                    session.flush()
                    ingest += time.perf_counter() - t0
                    done += CHUNK
                    progress.update(task, completed=done)
                latencies = []
                for q in range(questions):
                    t0 = time.perf_counter()
                    session.ask(QUESTIONS[q % len(QUESTIONS)], max_new_tokens=8)
                    latencies.append(time.perf_counter() - t0)
                rows[length] = {
                    "ingest_fps": length / ingest,
                    "ingest_vs_plain": ingest / plain[length],
                    "retained_bytes": session.memory()["total"],
                    "latency_p50_s": statistics.median(latencies),
                }
            results["methods"][method] = rows
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "engine.json").write_text(json.dumps(results, indent=1))
    report(results, lengths, console)
    plot(results, lengths, out_dir / "engine_latency.png")
    return results


def report(results: dict, lengths: list[int], console: Console) -> None:
    table = Table(title=f"engine benchmark ({results['tokens_per_frame']} tokens/frame)")
    for column in ("method", "frames", "ingest fps", "ingest / plain", "retained KV", "answer p50", "p50 / p50@first"):
        table.add_column(column, justify="right")
    for method, rows in results["methods"].items():
        first = rows[str(lengths[0])] if str(lengths[0]) in rows else rows[lengths[0]]
        for length in lengths:
            row = rows[length]
            table.add_row(method, str(length), f"{row['ingest_fps']:.1f}", f"{row['ingest_vs_plain']:.2f}x",
                          f"{row['retained_bytes'] / 2**20:.2f} MiB", f"{row['latency_p50_s'] * 1000:.0f} ms",
                          f"{row['latency_p50_s'] / first['latency_p50_s']:.2f}x")
    Console().print(table)


def plot(results: dict, lengths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for method, rows in results["methods"].items():
        left.plot(lengths, [rows[n]["latency_p50_s"] * 1000 for n in lengths], marker="o", label=method)
        right.plot(lengths, [rows[n]["retained_bytes"] / 2**20 for n in lengths], marker="o", label=method)
    for axis, label in ((left, "answer latency p50 (ms)"), (right, "retained KV (MiB)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("frames in the stream")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    left.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--questions", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    if any(n % CHUNK for n in args.lengths):
        parser.error(f"lengths must be multiples of {CHUNK}")
    run(sorted(args.lengths), args.questions, args.out)


if __name__ == "__main__":
    main()
