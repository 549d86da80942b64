"""GPU benchmark: the LLaVA-OneVision-7B and Qwen2.5-VL-7B architectures with random bf16 weights
(weights cannot be downloaded here; compute does not depend on their values), streams at 0.5 fps.

    python -m bench.gpu                      # on a CUDA machine: both 7B architectures, 1,800 frames
    python -m bench.gpu --methods rekv livevlm streamkv   # several methods on each model
    python -m bench.gpu --models qwen2.5-vl  # one architecture
    python -m bench.gpu --tiny --frames 240  # anywhere: tiny models on CPU, to keep it working

Reports encode frames/s, time to first token at the end of the stream (median of three questions),
decode tokens/s, peak GPU memory, and the number of 0.5 fps streams one device keeps up with: the
fewer of encode frames/s / 0.5 (compute) and how many streams' retained KV fit beside the shared
weights and work space (memory). ReKV's published reference: 11 frames/s encoding and 3.3 s answer
latency on an A100 (1 h video, 1,800 frames).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from transformers import LlavaOnevisionForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

from bench.engine import BENCH_QWEN_SPEC, BENCH_SPEC
from bench.figure import single_plot
from pipeline import Answer, StreamSession
from pipeline.config import PRESETS, frame_scaled_options
from pipeline.model import wrap_model
from synthetic.checkpoint import CheckpointSpec, build_config, build_processor
from synthetic.qwen_checkpoint import QwenSpec, build_qwen_config, build_qwen_processor

# LLaVA-OneVision-Qwen2-7B: SigLIP-so400m at 384 px (patch 14 -> 196 pooled tokens), Qwen2-7B
LLAVA_OV_7B = CheckpointSpec(image_size=384, patch_size=14, vision_hidden=1152, vision_layers=26, vision_heads=16,
                             text_hidden=3584, text_layers=28, text_heads=28, text_kv_heads=4, text_intermediate=18944)
# Qwen2.5-VL-7B-Instruct: its ViT (32 blocks, window attention, full at 7/15/23/31), Qwen2.5-7B with
# M-RoPE sections 16/24/24; frames at 448 px: 256 tokens per temporal patch of 2 frames
QWEN25_VL_7B = QwenSpec(frame_size=448, patch_size=14, vision_hidden=1280, vision_layers=32, vision_heads=16,
                        vision_intermediate=3420, window_size=112, text_hidden=3584, text_layers=28, text_heads=28,
                        text_kv_heads=4, text_intermediate=18944, mrope_section=(16, 24, 24), tokens_per_second=2,
                        rope_theta=1000000.0)
FPS = 0.5
REKV_A100_FPS = 11  # ReKV's published encode rate
DECODE_TOKENS = 16
QUESTIONS = ("What happened in the video?", "What color was the car?", "Where did the person go?")


def build(spec: CheckpointSpec | QwenSpec, device: str, dtype: torch.dtype, vision_intermediate: int | None = None,
          name: str = "tiny-random"):
    qwen = isinstance(spec, QwenSpec)
    processor = build_qwen_processor(spec) if qwen else build_processor(spec)
    config = (build_qwen_config if qwen else build_config)(spec, processor.tokenizer)
    if vision_intermediate:
        config.vision_config.intermediate_size = vision_intermediate
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: an fp32 7B would need 32 GB first
    try:
        with torch.device(device):
            model = (Qwen2_5_VLForConditionalGeneration if qwen else LlavaOnevisionForConditionalGeneration)(config)
    finally:
        torch.set_default_dtype(previous)
    return wrap_model(model, processor, name=name)


MODELS = {  # name -> (the 7B architecture on CUDA, the tiny one on CPU)
    "llava-ov": (lambda: build(LLAVA_OV_7B, "cuda", torch.bfloat16, 4304, "llava-ov-7b-random"),
                 lambda: build(BENCH_SPEC, "cpu", torch.float32, name="llava-ov-tiny-random")),
    "qwen2.5-vl": (lambda: build(QWEN25_VL_7B, "cuda", torch.bfloat16, name="qwen2.5-vl-7b-random"),
                   lambda: build(BENCH_QWEN_SPEC, "cpu", torch.float32, name="qwen2.5-vl-tiny-random")),
}


def timed_ask(session: StreamSession, question: str, max_new_tokens: int) -> tuple[float, Answer]:
    start = time.perf_counter()
    answer = session.ask(question, max_new_tokens=max_new_tokens)
    if session.model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, answer


def stream(model, method: str, frames: int, chunk: int, console: Console) -> dict:
    """Stream `frames` random frames into a fresh session of `method`, then ask QUESTIONS."""
    cuda = model.device.type == "cuda"
    size = model.frame_size
    session = StreamSession(model, method=method, **frame_scaled_options(method, model.dims.tokens_per_frame,
                                                                                 model.dims.frames_per_unit))
    rng = np.random.default_rng(0)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    report_every = max(chunk, frames // 10 // chunk * chunk)
    for done in range(chunk, frames + chunk, chunk):
        session.add_frames(rng.integers(0, 256, (chunk, size, size, 3), dtype=np.uint8))
        if done % report_every == 0:  # a line per tenth: device logs are not terminals
            console.log(f"{method}: {done}/{frames} frames, {done / (time.perf_counter() - start):.1f} frames/s")
    session.flush()
    if cuda:
        torch.cuda.synchronize()
    encode_fps = frames / (time.perf_counter() - start)
    # the first question also pays one-off kernel selection for the question's shapes
    ttfts = [timed_ask(session, question, 1)[0] for question in QUESTIONS]
    # the last question again, warm, with DECODE_TOKENS: the difference is decoding alone
    seconds, answer = timed_ask(session, QUESTIONS[-1], DECODE_TOKENS)
    decoded = len(answer.token_ids) - 1
    retained = session.memory()["total"]
    streams_by_compute = int(encode_fps / FPS)
    result = {
        "model": model.name, "method": method, "frames": frames, "encode_fps": encode_fps,
        "ttft_s": statistics.median(ttfts), "ttft_first_s": ttfts[0],
        "decode_tokens_per_s": decoded / (seconds - ttfts[-1]) if decoded and seconds > ttfts[-1] else None,
        "retained_kv_bytes": retained, "streams_by_compute": streams_by_compute, "peak_gpu_bytes": None,
        "streams_by_memory": None, "realtime_streams_at_0.5fps": streams_by_compute,
    }
    if cuda:  # every stream keeps its retained KV on the device; weights and work space are shared
        peak = torch.cuda.max_memory_allocated()
        shared = peak - retained
        streams_by_memory = int((torch.cuda.get_device_properties(0).total_memory - shared) // retained)
        result.update(peak_gpu_bytes=peak, streams_by_memory=streams_by_memory)
        result["realtime_streams_at_0.5fps"] = min(streams_by_compute, streams_by_memory)
    return result


def plot(report: dict, path: Path) -> None:
    """Encode frames/s per method, labelled with time to first token and streams one device holds."""
    runs = [run for run in report["runs"] if "error" not in run]
    with single_plot(path) as ax:
        names = [f"{run['model'].removesuffix('-random')}\n{run['method']}" for run in runs]
        bars = ax.bar(names, [run["encode_fps"] for run in runs], color="tab:blue")
        labels = [f"TTFT {run['ttft_s']:.2f} s\n{run['realtime_streams_at_0.5fps']} streams" for run in runs]
        ax.bar_label(bars, labels=labels, fontsize=8)
        ax.axhline(REKV_A100_FPS, color="tab:red", linestyle="--", label=f"ReKV on an A100 (paper): {REKV_A100_FPS} frames/s")
        ax.set_ylabel("encode frames/s (1 stream)")
        ax.set_title(f"{', '.join(report['models'])} on {report['device']}, {runs[0]['frames'] if runs else 0} frames",
                     fontsize=9)
        ax.margins(y=0.2)
        ax.legend(fontsize=8, loc="upper right")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU instead of the 7B on CUDA")
    parser.add_argument("--frames", type=int, default=1800)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=["rekv"], choices=sorted(PRESETS))
    parser.add_argument("--models", nargs="+", default=sorted(MODELS), choices=sorted(MODELS))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --tiny (a tiny model on CPU)")
    console = Console()
    device = "cpu (tiny model)" if args.tiny else torch.cuda.get_device_name()
    report = {"device": device, "models": [], "fps": FPS, "runs": []}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu{'_tiny' if args.tiny else ''}.json"
    for name in args.models:  # one model at a time, for every method; each run's figures are written as it ends
        model = MODELS[name][1 if args.tiny else 0]()
        report["models"].append(model.name)
        for method in args.methods:
            try:
                report["runs"].append(stream(model, method, args.frames, args.chunk, console))
            except Exception as error:  # noqa: BLE001 - a failing method must not cost the others' figures
                console.print_exception()
                report["runs"].append({"model": model.name, "method": method, "frames": args.frames, "error": repr(error)})
            console.print(report["runs"][-1])
            path.write_text(json.dumps(report, indent=1))
            plot(report, path.with_suffix(".png"))
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if any("error" in run for run in report["runs"]):
        sys.exit(1)
    return report


if __name__ == "__main__":
    main()
