"""Random-weight 7B architectures inside the Ray pipeline's own actors.

The model actors load their model with `pipeline.model.load_model(model_dir, device)`. A 7B
checkpoint with real weights cannot be downloaded here, and writing a random one to disk (15 GB
per architecture) and reading it back into every actor would cost a device call most of its time.
So a benchmark passes the actors a *marker directory* (`write_marker`: a `random_model.json`
naming a spec, nothing else) and starts Ray with `HOOK` as the workers' setup hook: in every
worker, once `pipeline.model` is imported, its `load_model` (and `load_dims`) builds the named architecture with
seeded random weights directly on the requested device (compute does not depend on the weights'
values) when given a marker directory, and loads real checkpoints as before.

The hook only registers an import watcher, so workers that never import the model (the
coordinator) do not pay for torch and transformers, and their memory is what it would be.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import sys
from pathlib import Path

MARKER = "random_model.json"
HOOK = "bench.random_weights.install"  # a runtime_env's worker_process_setup_hook
# name -> (spec module attribute in bench.gpu / bench.engine, vision MLP width override)
SPECS = {
    "llava-ov-7b": ("bench.gpu", "LLAVA_OV_7B", 4304),
    "tiny": ("bench.engine", "BENCH_SPEC", None),
}


def write_marker(directory: Path, spec: str) -> Path:
    """A directory that the patched load_model turns into `spec` with random weights."""
    if spec not in SPECS:
        raise ValueError(f"unknown random spec {spec!r}; choose one of {', '.join(SPECS)}")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MARKER).write_text(json.dumps({"spec": spec}))
    return directory


def frame_size(spec: str) -> int:
    """The square frame side (px) the spec's vision tower takes, without building it."""
    module, name, _ = SPECS[spec]
    return getattr(importlib.import_module(module), name).image_size


def build(spec: str, device: str = "cpu", dtype=None):
    """The VideoLLM of `spec` with random weights on `device` (bf16 on CUDA, float32 on CPU, as
    load_model defaults)."""
    import torch

    from bench.gpu import build as build_model

    module, name, vision_intermediate = SPECS[spec]
    checkpoint_spec = getattr(importlib.import_module(module), name)
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    return build_model(checkpoint_spec, device, dtype, vision_intermediate, name=f"{spec}-random")


def _patch(module) -> None:
    original = module.load_model

    def load_model(path, device: str = "cpu", dtype=None):
        marker = Path(path) / MARKER
        if marker.is_file():
            return build(json.loads(marker.read_text())["spec"], device, dtype)
        return original(path, device, dtype)

    load_model.__doc__ = original.__doc__
    module.load_model = load_model
    original_dims = module.load_dims

    def load_dims(path):  # the compressor actor: the shapes only, built on the meta device
        marker = Path(path) / MARKER
        if marker.is_file():
            return build(json.loads(marker.read_text())["spec"], "meta").dims
        return original_dims(path)

    load_dims.__doc__ = original_dims.__doc__
    module.load_dims = load_dims


class _Watcher(importlib.abc.MetaPathFinder):
    """Patches pipeline.model right after it executes (before anything binds its load_model)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "pipeline.model":
            return None
        sys.meta_path.remove(self)  # find the real spec below, and watch no more
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Ray's worker_process_setup_hook: patch pipeline.model now or when it is first imported."""
    if "pipeline.model" in sys.modules:
        _patch(sys.modules["pipeline.model"])
    elif not any(isinstance(finder, _Watcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Watcher())
