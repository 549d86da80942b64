"""Tiny LLaVA-OneVision checkpoints built on disk once per test session."""

import pytest

from synthetic.checkpoint import CheckpointSpec, build_checkpoint

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
