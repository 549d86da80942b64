"""streamkv's Ray-free core: load a Video-LLM, stream frames into its KV cache, ask questions."""

from pipeline.config import PRESETS, EngineConfig, make_config
from pipeline.errors import (
    ConfigError,
    InvalidInputError,
    NoFramesError,
    StreamKVError,
    UnknownStreamError,
    UnsupportedModelError,
)
from pipeline.model import VideoLLM, load_model
from pipeline.answerer import Answer, Evidence
from pipeline.session import StreamSession

__all__ = [
    "PRESETS", "EngineConfig", "make_config", "ConfigError", "InvalidInputError", "NoFramesError",
    "StreamKVError", "UnknownStreamError", "UnsupportedModelError", "VideoLLM", "load_model", "Answer", "Evidence", "StreamSession",
]
