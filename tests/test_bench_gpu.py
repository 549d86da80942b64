"""The GPU benchmark script stays working where there is no GPU: its tiny CPU mode runs end to end
(the 7B run needs a CUDA device; BENCHMARKS.md says what was run where)."""

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_the_tiny_cpu_mode_reports_every_figure(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench.gpu", "--tiny", "--frames", "32", "--methods", "rekv",
                          "livevlm", "--out", str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_tiny.json").read_text())
    assert (tmp_path / "gpu_tiny.png").stat().st_size > 0
    assert report["device"] == "cpu (tiny model)"
    # both architectures by default, one after the other, every method on each
    assert report["models"] == ["llava-ov-tiny-random", "qwen2.5-vl-tiny-random"]
    assert [(run["model"], run["method"]) for run in report["runs"]] == [
        (model, method) for model in report["models"] for method in ("rekv", "livevlm")]
    for result in report["runs"]:
        assert (result["frames"], result["peak_gpu_bytes"], result["streams_by_memory"]) == (32, None, None)
        assert result["encode_fps"] > 0 and result["ttft_s"] > 0 and result["retained_kv_bytes"] > 0
        assert result["decode_tokens_per_s"] > 0  # the tiny random model does not stop at its first token
        assert result["realtime_streams_at_0.5fps"] == result["streams_by_compute"] == int(result["encode_fps"] / 0.5)


def test_the_7b_architectures_are_the_published_ones():
    """Built on the meta device (no memory): parameter counts and visual tokens of the releases
    (Qwen2.5-VL-7B: 8.29 B with its 152k vocabulary, 7.20 B without; 256 tokens per 2 frames at 448 px)."""
    import torch

    from bench.gpu import LLAVA_OV_7B, QWEN25_VL_7B, build

    qwen = build(QWEN25_VL_7B, "meta", torch.bfloat16, name="qwen")
    llava = build(LLAVA_OV_7B, "meta", torch.bfloat16, 4304, name="llava")
    params = lambda m: sum(p.numel() for p in m.model.parameters()) - m.lm.embed_tokens.weight.numel() - m.model.lm_head.weight.numel()  # noqa: E731
    assert abs(params(qwen) / 1e9 - 7.20) < 0.01 and abs(params(llava) / 1e9 - 6.94) < 0.01
    assert (qwen.family, qwen.dims.tokens_per_unit, qwen.dims.frames_per_unit, qwen.frame_size) == ("qwen2_5_vl", 256, 2, 448)
    assert (llava.dims.tokens_per_frame, llava.dims.layers, llava.dims.kv_heads) == (196, 28, 4)
