"""streamkv's Ray-free core: load a Video-LLM, stream frames into its KV cache, ask questions.

Exports load lazily (PEP 562): actor workers that need only `pipeline.decode` or the errors do
not pay for importing transformers.
"""

from importlib import import_module

from pipeline.errors import (
    ConfigError,
    InvalidInputError,
    NoFramesError,
    StreamKVError,
    UnknownStreamError,
    UnsupportedModelError,
)

_LAZY = {
    "PRESETS": "pipeline.config", "EngineConfig": "pipeline.config", "make_config": "pipeline.config",
    "VideoLLM": "pipeline.model", "load_model": "pipeline.model",
    "Answer": "pipeline.answerer", "Evidence": "pipeline.answerer",
    "StreamSession": "pipeline.session",
}

__all__ = [
    *_LAZY, "ConfigError", "InvalidInputError", "NoFramesError", "StreamKVError", "UnknownStreamError",
    "UnsupportedModelError",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
