"""Engine benchmark: ingest speed, retained KV and answer latency per method as the stream grows.

    python -m bench.engine [--lengths 256 1024 4096] [--questions 5] [--out bench/results]
    python -m bench.engine --model qwen2.5-vl   # the tiny Qwen2.5-VL (results: engine_qwen2.5-vl.*)
    python -m bench.engine --model qwen3-vl     # the tiny Qwen3-VL (results: engine_qwen3-vl.*)

One tiny checkpoint, one run, every preset side by side. Each preset streams frames in chunks up
to each length, then answers `--questions` questions (p50 latency). The reference is transformers'
plain incremental forward (vision tower + language model with its own DynamicCache) over the
same frames in the same chunks; all run in lockstep (see run). Token-valued knobs of the presets (n_local, budget_tokens) are
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
from synthetic.qwen3_checkpoint import Qwen3Spec, build_qwen3_checkpoint
from synthetic.qwen_checkpoint import QwenSpec, build_qwen_checkpoint
from synthetic.world import WorldConfig, generate_stream

QUESTIONS = ["what color was the star?", "which shape was red?", "what is on screen now?", "how many circles?"]
CHUNK = 8  # frames per add_frames call, as a camera feeding 16 s of video at 0.5 fps
BENCH_SPEC = CheckpointSpec(image_size=64, patch_size=8, text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2)
# the same sizes as a Qwen2.5-VL: 64 px frames, 16 tokens per temporal patch of 2 frames
BENCH_QWEN_SPEC = QwenSpec(frame_size=64, patch_size=8, text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2)
# and a Qwen3-VL of those sizes (deepstack from 2 of its 3 vision layers)
BENCH_QWEN3_SPEC = Qwen3Spec(frame_size=64, patch_size=8, text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2,
                             head_dim=16, mrope_section=(4, 2, 2))
CHECKPOINTS = {"llava-ov": lambda root: build_checkpoint(root / "bench", BENCH_SPEC),
               "qwen2.5-vl": lambda root: build_qwen_checkpoint(root / "bench", BENCH_QWEN_SPEC),
               "qwen3-vl": lambda root: build_qwen3_checkpoint(root / "bench", BENCH_QWEN3_SPEC)}


def frames_for(count: int, seed: int = 90_000) -> np.ndarray:
    """A synthetic-world video (scenes of 3-12 frames with hard cuts), 64x64."""
    return generate_stream(count, seed, WorldConfig()).frames


class PlainForward:
    """transformers' own incremental forward: vision tower + language model with its DynamicCache,
    attention over the whole cache (what ingest would cost without a streaming engine)."""

    def __init__(self, model):
        self.model, self.cache = model, DynamicCache(config=model.lm.config)
        self.seen = 0  # frames so far
        prefix = model.prompt_parts("You are a helpful assistant.", "").prefix_ids
        with torch.inference_mode():
            model.lm(input_ids=torch.tensor([prefix]), past_key_values=self.cache, use_cache=True)

    @torch.inference_mode()
    def add_frames(self, frames: np.ndarray) -> None:
        """The frames' units as the model takes them (Qwen3-VL: with timestamp text and deepstack)."""
        tokens, deepstack = self.model.encode_units(frames)
        per_unit, seen = self.model.dims.frames_per_unit, self.seen
        times = [((seen + i * per_unit) / 0.5, (seen + (i + 1) * per_unit - 1) / 0.5) for i in range(len(tokens))]
        inputs = self.model.unit_inputs([(t, times[i], None if deepstack is None else deepstack[i])
                                         for i, t in enumerate(tokens)])
        extra = {} if inputs.deepstack is None else {"visual_pos_masks": inputs.visual_mask[None],
                                                     "deepstack_visual_embeds": list(inputs.deepstack)}
        self.model.lm(inputs_embeds=inputs.embeds[None], past_key_values=self.cache, use_cache=True, **extra)
        self.seen = seen + len(frames)


def run(lengths: list[int], questions: int, out_dir: Path, checkpoint: str = "llava-ov") -> dict:
    """Every preset and the plain forward advance in lockstep, chunk by chunk in rotating order, and
    answer in rotating order at each length: slow drift in machine load hits all of them alike."""
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(CHECKPOINTS[checkpoint](Path(tmp)))
    frames = frames_for(max(lengths))
    presets = {m: frame_scaled_options(m, model.dims.tokens_per_frame, model.dims.frames_per_unit) for m in PRESETS}
    for method, options in presets.items():  # warm-up, untimed: first calls pay one-off costs
        warm = StreamSession(model, method=method, **options)
        warm.add_frames(frames[:CHUNK])
        warm.ask(QUESTIONS[0], max_new_tokens=2)
    PlainForward(model).add_frames(frames[:CHUNK])
    sessions = {m: StreamSession(model, method=m, **options) for m, options in presets.items()}
    plain = PlainForward(model)
    ingest = {name: 0.0 for name in [*sessions, "plain"]}
    rows: dict = {m: {} for m in sessions}
    with Progress(console=console) as progress:
        task = progress.add_task("streaming", total=max(lengths))
        for step, done in enumerate(range(0, max(lengths), CHUNK)):
            chunk = frames[done : done + CHUNK]
            names = list(ingest)
            for name in names[step % len(names) :] + names[: step % len(names)]:
                start = time.perf_counter()
                if name == "plain":
                    plain.add_frames(chunk)
                else:
                    sessions[name].add_frames(chunk)
                    sessions[name].flush()
                ingest[name] += time.perf_counter() - start
            progress.update(task, completed=done + CHUNK)
            if done + CHUNK in lengths:
                measure(sessions, rows, done + CHUNK, ingest, questions)
    results = {"model": checkpoint, "tokens_per_frame": model.dims.tokens_per_frame, "presets": presets, "methods": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if checkpoint == "llava-ov" else f"_{checkpoint}"
    (out_dir / f"engine{suffix}.json").write_text(json.dumps(results, indent=1))
    report(results, lengths, console)
    plot(results, lengths, out_dir / f"engine{suffix}_latency.png")
    return results


def measure(sessions: dict, rows: dict, length: int, ingest: dict, questions: int) -> None:
    latencies = {m: [] for m in sessions}
    names = list(sessions)
    for q in range(questions):
        for name in names[q % len(names) :] + names[: q % len(names)]:
            start = time.perf_counter()
            sessions[name].ask(QUESTIONS[q % len(QUESTIONS)], max_new_tokens=8)
            latencies[name].append(time.perf_counter() - start)
    for name, session in sessions.items():
        rows[name][length] = {
            "ingest_fps": length / ingest[name],
            "ingest_vs_plain": ingest[name] / ingest["plain"],
            "retained_bytes": session.memory()["total"],
            "latency_p50_s": statistics.median(latencies[name]),
        }


def report(results: dict, lengths: list[int], console: Console) -> None:
    table = Table(title=f"engine benchmark ({results['model']}, {results['tokens_per_frame']} tokens/frame)")
    for column in ("method", "frames", "ingest fps", "ingest / plain", "retained KV", "answer p50", "p50 / p50@first"):
        table.add_column(column, justify="right")
    for method, rows in results["methods"].items():
        first = rows[lengths[0]]
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--questions", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps a shared CPU stable)")
    parser.add_argument("--model", choices=sorted(CHECKPOINTS), default="llava-ov", help="which tiny random checkpoint")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if any(n % CHUNK for n in args.lengths):
        parser.error(f"lengths must be multiples of {CHUNK}")
    run(sorted(args.lengths), args.questions, args.out, args.model)


if __name__ == "__main__":
    main()
