"""Retained KV of each preset with its own values, against `full`, on long streams, by what it is.

    python -m bench.memory [--lengths 1200 3600] [--scenes 3-12 20-60] [--model models/demo]

Presets are used as they are (their token-valued knobs scaled to the model's tokens per frame by
make_config; no override). The video is the synthetic world with scenes of the given length range
(StreamKV's semantic segments follow the scenes, and each segment adds one summary block). Each
preset's bytes are split into: kept frame blocks, summary blocks, sinks, the raw local window, the
block index (mean keys, allocated capacity) and LiveVLM's long-term pool; fractions of full's total.
Raw numbers: bench/results/memory.json; plot: bench/results/memory.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from bench.figure import single_plot
from pipeline import StreamSession, load_model
from pipeline.kv_store import tensor_bytes
from synthetic.world import WorldConfig, generate_stream

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "demo"
METHODS = ("full", "rekv", "streamkv", "livevlm")
CHUNK = 8


def breakdown(session: StreamSession) -> dict[str, int]:
    """The session's retained bytes by tier, frame and summary blocks apart (exact storages)."""
    store, seen = session.store, set()
    kinds = {"frame": [], "summary": []}
    for blocks in store.blocks:
        for uid, keys, values in zip(blocks.uids, blocks.keys, blocks.values):
            kinds[store.units[uid].kind] += [keys, values]
    tiers = {"sinks": tensor_bytes([t for kv in store.sinks for t in kv], seen),
             "frame blocks": tensor_bytes(kinds["frame"], seen),
             "summary blocks": tensor_bytes(kinds["summary"], seen)}
    memory = store.memory()
    tiers.update({"long_term": memory["long_term"], "window": memory["window"], "index": memory["index"]})
    assert sum(tiers.values()) == memory["total"], (tiers, memory)
    return tiers


def run(model_dir: Path, lengths: list[int], scenes: list[tuple[int, int]], console: Console) -> list[dict]:
    model = load_model(model_dir)
    rows = []
    with Progress(console=console) as progress:
        for scene_min, scene_max in scenes:
            frames = generate_stream(max(lengths), 7, WorldConfig(scene_min=scene_min, scene_max=scene_max)).frames
            sessions = {m: StreamSession(model, method=m) for m in METHODS}
            task = progress.add_task(f"scenes {scene_min}-{scene_max}", total=max(lengths))
            for done in range(0, max(lengths), CHUNK):
                for session in sessions.values():
                    session.add_frames(frames[done:done + CHUNK])
                progress.advance(task, CHUNK)
                if done + CHUNK in lengths:
                    parts = {}
                    for method, session in sessions.items():
                        session.flush()
                        parts[method] = breakdown(session)
                    full = sum(parts["full"].values())
                    segments = len({u.segment for u in sessions["streamkv"].store.units.values()})
                    for method, tiers in parts.items():
                        rows.append({"scenes": f"{scene_min}-{scene_max}", "frames": done + CHUNK, "method": method,
                                     "total": sum(tiers.values()), "of_full": sum(tiers.values()) / full,
                                     "parts_of_full": {k: v / full for k, v in tiers.items()},
                                     "streamkv_mean_segment": (done + CHUNK) / segments,
                                     "options": {k: getattr(sessions[method].config, k) for k in ("n_local", "budget_tokens")}})
    return rows


def report(rows: list[dict], out_dir: Path, console: Console) -> None:
    table = Table("scenes", "frames", "method", "retained", "of full", "frame blocks", "summaries", "window",
                  "index", "long-term", title="Retained KV, presets as they are")
    for r in rows:
        p = r["parts_of_full"]
        table.add_row(r["scenes"], str(r["frames"]), r["method"], f"{r['total'] / 2**20:.2f} MiB",
                      f"{r['of_full']:.1%}", *(f"{p[k]:.1%}" for k in ("frame blocks", "summary blocks", "window",
                                                                         "index", "long_term")))
    console.print(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "memory.json").write_text(json.dumps(rows, indent=1))
    last = [r for r in rows if r["frames"] == max(x["frames"] for x in rows)]
    parts = ["sinks", "frame blocks", "summary blocks", "window", "index", "long_term"]
    with single_plot(out_dir / "memory.png", size=(7, 4)) as ax:
        labels = [f"{r['method']}\n{r['scenes']}" for r in last]
        bottom = [0.0] * len(last)
        for part in parts:
            values = [r["parts_of_full"][part] for r in last]
            ax.bar(labels, values, bottom=bottom, label=part)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.axhline(0.5, color="black", linewidth=0.8, linestyle="--")
        ax.set_ylabel(f"retained KV / full's, at {last[0]['frames']} frames")
        ax.set_title("What each preset retains (scenes of N frames)")
        ax.legend(fontsize=7)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1200, 3600])
    parser.add_argument("--scenes", nargs="+", default=["3-12", "20-60"], help="scene length ranges, MIN-MAX frames")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if any(n % CHUNK for n in args.lengths):
        parser.error(f"lengths must be multiples of {CHUNK}")
    scenes = [tuple(int(v) for v in s.split("-")) for s in args.scenes]
    console = Console(stderr=True, width=150)
    report(run(args.model, sorted(args.lengths), scenes, console), args.out, console)


if __name__ == "__main__":
    main()
