"""The demo: stream a generated video through the engine with the shipped model and ask questions.

    python -m synthetic.demo [--method streamkv] [--frames 600] [--questions 16] [--seed 90001]

Prints every question when it is asked, the model's answer, the truth and the evidence (time
ranges the answer attended to), then accuracy, retained KV and latency. Seeds >= 90000 are never
used in training.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline import StreamSession, load_model
from pipeline.config import PRESETS, frame_scaled_options
from synthetic.world import SYSTEM_PROMPT, WorldConfig, generate_stream, questions

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "demo"


def context_options(preset: str, frames: int | None, tokens_per_frame: int) -> dict:
    """The preset's options sized so the method shows the model about `frames` frames at once (a
    small model's training clip length): retrieved blocks, local windows, LiveVLM's short-term +
    40% of long-term. frames=None/0: the papers' budgets, scaled to tokens per frame."""
    options = frame_scaled_options(preset, tokens_per_frame)
    if not frames:
        return options
    per_preset = {
        "full": {},
        "uniform": {"top_k": frames},
        "recent": {"recent_blocks": frames},
        "rekv": {"top_k": frames, "n_local": frames * tokens_per_frame},
        "streamkv": {"top_k": frames, "n_local": frames * tokens_per_frame, "recent_blocks": max(1, frames // 4)},
        "livevlm": {"n_local": frames // 4 * tokens_per_frame,
                    "budget_tokens": round(frames * 3 / 4 / 0.4) * tokens_per_frame},
    }
    return {**options, **per_preset[preset]}


def first_word(text: str) -> str:
    words = text.strip().lower().replace("?", " ").replace(".", " ").split()
    return words[0] if words else ""


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--method", default="streamkv", choices=sorted(PRESETS))
    parser.add_argument("--frames", type=int, default=600)
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--seed", type=int, default=90001)
    parser.add_argument("--context-frames", type=int, default=8,
                        help="frames shown to the model at once (the demo model reads ~8 best; trained on <= 32)")
    args = parser.parse_args(argv)

    console = Console()
    model = load_model(args.model)
    stream = generate_stream(args.frames, args.seed, WorldConfig())
    asked = questions(stream, args.questions, args.seed)
    session = StreamSession(model, method=args.method, system_prompt=SYSTEM_PROMPT,
                            **context_options(args.method, args.context_frames, model.dims.tokens_per_frame))
    console.print(f"[bold]{args.method}[/] on a {args.frames}-frame stream (seed {args.seed}), model {args.model.name}")
    table = Table("t (s)", "question", "answer", "truth", "", "evidence (s)")
    correct, latencies, done = 0, [], 0
    for question in asked:
        if question.ask_at > done:
            session.add_frames(stream.frames[done : question.ask_at], timestamps=stream.times[done : question.ask_at])
            done = question.ask_at
        start = time.perf_counter()
        answer = session.ask(question.text, max_new_tokens=4)
        latencies.append(time.perf_counter() - start)
        ok = first_word(answer.text) == question.answer
        correct += ok
        top = sorted(answer.evidence, key=lambda e: -e.score)[:3]
        table.add_row(f"{stream.times[done - 1]:.0f}", question.text, answer.text.strip(), question.answer,
                      "[green]✓[/]" if ok else "[red]✗[/]", ", ".join(f"{e.times[0]:.0f}-{e.times[1]:.0f}" for e in top))
    console.print(table)
    accuracy = correct / max(len(asked), 1)
    memory = session.memory()
    console.print(f"accuracy {correct}/{len(asked)} = {accuracy:.0%} · retained KV {memory['total'] / 2**20:.2f} MiB"
                  f" · median answer latency {sorted(latencies)[len(latencies) // 2] * 1000:.0f} ms")
    return accuracy


if __name__ == "__main__":
    main()
