"""GPU benchmark: the LLaVA-OneVision-7B architecture with random bf16 weights (weights cannot be
downloaded here; compute does not depend on their values), streams at 0.5 fps.

    python -m bench.gpu                      # on a CUDA machine: the 7B architecture, 1,800 frames
    python -m bench.gpu --tiny --frames 240  # anywhere: a tiny model on CPU, to keep it working

Reports encode frames/s, time to first token at the end of the stream, peak GPU memory, and the
number of 0.5 fps streams one device keeps up with (encode frames/s / 0.5). ReKV's published
reference: 11 frames/s encoding and 3.3 s answer latency on an A100 (1 h video, 1,800 frames).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import track
from transformers import LlavaOnevisionForConditionalGeneration

from bench.engine import BENCH_SPEC
from pipeline import StreamSession
from pipeline.config import frame_scaled_options
from pipeline.model import wrap_model
from synthetic.checkpoint import CheckpointSpec, build_config, build_processor

# LLaVA-OneVision-Qwen2-7B: SigLIP-so400m at 384 px (patch 14 -> 196 pooled tokens), Qwen2-7B
LLAVA_OV_7B = CheckpointSpec(image_size=384, patch_size=14, vision_hidden=1152, vision_layers=26, vision_heads=16,
                             text_hidden=3584, text_layers=28, text_heads=28, text_kv_heads=4, text_intermediate=18944)
FPS = 0.5


def build(spec: CheckpointSpec, device: str, dtype: torch.dtype, vision_intermediate: int | None = None):
    processor = build_processor(spec)
    config = build_config(spec, processor.tokenizer)
    if vision_intermediate:
        config.vision_config.intermediate_size = vision_intermediate
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: an fp32 7B would need 32 GB first
    try:
        with torch.device(device):
            model = LlavaOnevisionForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return wrap_model(model, processor, name="llava-ov-7b-random" if spec is LLAVA_OV_7B else "tiny-random")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU instead of the 7B on CUDA")
    parser.add_argument("--frames", type=int, default=1800)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--method", default="rekv")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --tiny (a tiny model on CPU)")
    device = "cpu" if args.tiny else "cuda"
    model = build(BENCH_SPEC, "cpu", torch.float32) if args.tiny else build(LLAVA_OV_7B, "cuda", torch.bfloat16, 4304)
    size = model.model.config.vision_config.image_size
    options = frame_scaled_options(args.method, model.dims.tokens_per_frame)
    session = StreamSession(model, method=args.method, **options)
    rng = np.random.default_rng(0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in track(range(0, args.frames, args.chunk), description=f"streaming {args.frames} frames"):
        session.add_frames(rng.integers(0, 256, (args.chunk, size, size, 3), dtype=np.uint8))
    session.flush()
    if device == "cuda":
        torch.cuda.synchronize()
    encode_fps = args.frames / (time.perf_counter() - start)
    start = time.perf_counter()
    session.ask("What happened in the video?", max_new_tokens=1)
    if device == "cuda":
        torch.cuda.synchronize()
    ttft = time.perf_counter() - start
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (tiny model)",
        "model": model.name, "method": args.method, "frames": args.frames, "encode_fps": encode_fps,
        "ttft_s": ttft, "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        "retained_kv_bytes": session.memory()["total"], "realtime_streams_at_0.5fps": int(encode_fps / FPS),
    }
    Console().print(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"gpu{'_tiny' if args.tiny else ''}.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
