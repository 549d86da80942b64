"""Tiny LLaVA-OneVision, Qwen2.5-VL and Qwen3-VL checkpoints built on disk once per test session."""

import pytest

from synthetic.checkpoint import CheckpointSpec, build_checkpoint
from synthetic.qwen3_checkpoint import Qwen3Spec, build_qwen3_checkpoint
from synthetic.qwen_checkpoint import QwenSpec, build_qwen_checkpoint

# Two shapes: grouped-query attention with head_dim 16, and plain multi-head with head_dim 32.
TINY_SPECS = {
    "gqa": CheckpointSpec(text_hidden=64, text_heads=4, text_kv_heads=2, text_layers=3, init_std=0.15,
                          words=("red", "green", "circle", "star"), seed=1),
    "mha": CheckpointSpec(text_hidden=96, text_heads=3, text_kv_heads=3, text_layers=2, image_size=48,
                          patch_size=12, init_std=0.15, words=("red", "green", "circle", "star"), seed=2),
}


@pytest.fixture(scope="session")
def checkpoint_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: str(build_checkpoint(root / name, spec)) for name, spec in TINY_SPECS.items()}


@pytest.fixture(scope="session", params=sorted(TINY_SPECS))
def tiny_model(request, checkpoint_dirs):
    from pipeline import load_model

    return load_model(checkpoint_dirs[request.param])


@pytest.fixture(scope="session")
def gqa_model(checkpoint_dirs):
    from pipeline import load_model

    return load_model(checkpoint_dirs["gqa"])


# Tiny Qwen2.5-VL checkpoints: grouped-query (head_dim 16, M-RoPE sections 2/3/3) and multi-head
# (head_dim 24, sections 4/4/4); 16 and 9 tokens per temporal patch.
QWEN_SPECS = {
    "qwen-gqa": QwenSpec(text_hidden=64, text_heads=4, text_kv_heads=2, text_layers=3, mrope_section=(2, 3, 3),
                         init_std=0.15, words=("red", "green", "circle", "star"), seed=3),
    "qwen-mha": QwenSpec(text_hidden=72, text_heads=3, text_kv_heads=3, text_layers=2, mrope_section=(4, 4, 4),
                         frame_size=48, patch_size=8, init_std=0.15, words=("red", "green", "circle", "star"), seed=4),
}


@pytest.fixture(scope="session")
def qwen_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("qwen_checkpoints")
    return {name: str(build_qwen_checkpoint(root / name, spec)) for name, spec in QWEN_SPECS.items()}


@pytest.fixture(scope="session", params=sorted(QWEN_SPECS))
def qwen_model(request, qwen_dirs):
    from pipeline import load_model

    return load_model(qwen_dirs[request.param])


# Tiny Qwen3-VL checkpoints: grouped-query (head_dim 16, interleaved sections 4/2/2) and multi-head
# (head_dim 24, 4/4/4); 16 and 9 visual tokens per temporal patch; deepstack from 2 vision layers.
QWEN3_SPECS = {
    "qwen3-gqa": Qwen3Spec(text_hidden=64, text_heads=4, text_kv_heads=2, head_dim=16, text_layers=3,
                           mrope_section=(4, 2, 2), init_std=0.15, words=("red", "green", "circle", "star"), seed=5),
    "qwen3-mha": Qwen3Spec(text_hidden=72, text_heads=3, text_kv_heads=3, head_dim=24, text_layers=2,
                           mrope_section=(4, 4, 4), frame_size=48, patch_size=8, init_std=0.15,
                           words=("red", "green", "circle", "star"), seed=6),
}


@pytest.fixture(scope="session")
def qwen3_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("qwen3_checkpoints")
    return {name: str(build_qwen3_checkpoint(root / name, spec)) for name, spec in QWEN3_SPECS.items()}


@pytest.fixture(scope="session", params=sorted(QWEN3_SPECS))
def qwen3_model(request, qwen3_dirs):
    from pipeline import load_model

    return load_model(qwen3_dirs[request.param])
