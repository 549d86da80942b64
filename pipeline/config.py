"""One config dataclass composes the strategies; methods are named presets of it.

A method is a choice of segmentation x compression x retrieval x budget (docs/METHODS.md). Values the
papers leave open are marked "chosen" and are exposed here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline.errors import ConfigError

# docs/METHODS.md's list of what the guidance prompt asks the model to attend to, said briefly
GUIDANCE_PROMPT = (
    "Attend to objects and attributes, actions and their timing, text and numbers on screen, causes "
    "and anomalies, counts and layout, and states easily confused."
)


@dataclass(frozen=True)
class EngineConfig:
    # Segmentation: what one encoded chunk (segment) is.
    segmentation: str = "uniform"  # uniform | semantic
    segment_frames: int = 8  # uniform: frames per segment (chosen)
    min_frames: int = 4  # semantic: a segment has at least this many frames
    max_frames: int = 64  # semantic: beyond this the two most similar adjacent frames merge
    threshold: float = 0.99  # semantic: cosine similarity that keeps a frame in the segment
    # Compression: what is retained of an encoded segment.
    compression: str = "none"  # none | guidance | vsb | fifo
    keep_ratio: float = 1.0  # guidance: fraction of a segment's frame blocks kept per layer
    budget_tokens: int | None = None  # vsb: long-term tokens M kept per layer
    vsb_queries: int = 64  # vsb: scores come from the last r vision tokens (chosen)
    vsb_top_ratio: float = 0.25  # vsb: phase 1 keeps the top R = ratio * M tokens (chosen)
    vsb_bucket: int = 1  # vsb: bucket capacity B
    vsb_head_pool: str = "mean"  # vsb: pooling of attention over heads, mean | max (chosen)
    guidance_prompt: str = GUIDANCE_PROMPT
    # Retrieval: what a question attends to.
    retrieval: str = "none"  # none | block_mean | summary | page | uniform
    top_k: int = 64  # blocks per layer (the base when adaptive)
    page_ratio: float = 0.4  # page: fraction of long-term pages retrieved per layer
    page_tokens: int = 16  # page: tokens per page
    similarity: str = "dot"  # dot | cosine
    # Budgets.
    adaptive: bool = False  # layer-adaptive budgets for compression and retrieval
    adaptive_temp: float = 0.5  # per-layer counts stay within base * (1 -+ temp)
    recent_blocks: int = 0  # the most recent blocks always in context (fifo: all that is kept)
    # Streaming encoding.
    n_local: int | None = None  # local window (tokens) new frames attend to, plus sinks; None = all
    # Inputs.
    max_question_tokens: int = 256
    frame_rate: float = 0.5  # timestamps of frames given without them: index / frame_rate
    vision_batch: int = 32

    @property
    def summaries(self) -> bool:
        """StreamKV's segment summary pseudo-frames exist exactly when they are retrieved."""
        return self.retrieval == "summary"

    def validate(self) -> "EngineConfig":
        choices = {
            "segmentation": ("uniform", "semantic"),
            "compression": ("none", "guidance", "vsb", "fifo"),
            "retrieval": ("none", "block_mean", "summary", "page", "uniform"),
            "similarity": ("dot", "cosine"),
            "vsb_head_pool": ("mean", "max"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        for name in ("segment_frames", "min_frames", "max_frames", "top_k", "page_tokens", "vsb_queries",
                     "vsb_bucket", "max_question_tokens", "vision_batch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("keep_ratio", "page_ratio", "vsb_top_ratio"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in (0, 1], got {getattr(self, name)!r}")
        if not 0.0 <= self.adaptive_temp < 1.0:
            raise ConfigError(f"adaptive_temp must be in [0, 1), got {self.adaptive_temp!r}")
        if not -1.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold is a cosine similarity in [-1, 1], got {self.threshold!r}")
        if self.min_frames > self.max_frames:
            raise ConfigError("min_frames must not exceed max_frames")
        if self.recent_blocks < 0:
            raise ConfigError("recent_blocks must be >= 0")
        if self.n_local is not None and self.n_local < 1:
            raise ConfigError("n_local must be a positive number of tokens or None")
        if self.frame_rate <= 0:
            raise ConfigError("frame_rate must be positive")
        if self.retrieval == "page" and self.compression != "vsb":
            raise ConfigError("retrieval='page' reads the long-term memory that compression='vsb' builds")
        if self.compression == "vsb":
            if self.retrieval in ("block_mean", "summary"):
                raise ConfigError("compression='vsb' keeps tokens, not blocks: use retrieval='page' or 'none'")
            if self.budget_tokens is None or self.budget_tokens < 1:
                raise ConfigError("compression='vsb' needs budget_tokens (the long-term size M) >= 1")
            if self.n_local is None:
                raise ConfigError("compression='vsb' needs n_local (the short-term memory) to be set")
        if self.retrieval == "uniform" and self.compression != "none":
            raise ConfigError("retrieval='uniform' re-encodes sampled frames: it keeps visual tokens, not KV")
        if self.compression == "fifo" and self.recent_blocks < 1:
            raise ConfigError("compression='fifo' keeps the last recent_blocks blocks: set recent_blocks >= 1")
        return self


PRESETS: dict[str, dict] = {
    # The whole stream in context: exactly transformers' own forward on the same video and prompt.
    "full": {},
    # The base model on N frames sampled uniformly from the stream so far, encoded afresh.
    "uniform": {"retrieval": "uniform", "top_k": 32},
    # Only the last N frames.
    "recent": {"compression": "fifo", "recent_blocks": 32},
    # ReKV: uniform one-frame blocks, top-64 per layer by mean key, local window of 15k tokens.
    "rekv": {"retrieval": "block_mean", "top_k": 64, "n_local": 15000},
    # StreamKV: semantic segments, summaries, guidance compression (down 60%), adaptive budgets.
    "streamkv": {
        "segmentation": "semantic",
        "compression": "guidance",
        "keep_ratio": 0.4,
        "retrieval": "summary",
        "top_k": 64,
        "adaptive": True,
        "adaptive_temp": 0.5,
        "recent_blocks": 8,
        "n_local": 15000,
    },
    # LiveVLM v2: short-term window, VSB-compressed long-term memory of M tokens, page retrieval.
    "livevlm": {
        "compression": "vsb",
        "budget_tokens": 12000,
        "retrieval": "page",
        "page_ratio": 0.4,
        "n_local": 4096,  # short-term memory size (chosen: not given in the paper)
    },
}


PAPER_TOKENS_PER_FRAME = 196  # LLaVA-OneVision-7B at 384 px: the unit of the papers' token knobs
TOKEN_KNOBS = ("n_local", "budget_tokens")  # token-valued knobs the presets state in the papers' unit
BLOCK_KNOBS = ("top_k", "recent_blocks")  # counted in stored units: one frame in the papers


def frame_scaled_options(method: str, tokens_per_frame: int, frames_per_unit: int = 1) -> dict:
    """The preset's options with token-valued knobs (n_local, budget_tokens) rescaled so they keep
    the same number of frames' worth as in the papers, for a model with `tokens_per_frame`
    (ReKV's 15,000-token window is 76 frames of 196 tokens: 76 frames on every model), and
    block counts (top_k, recent_blocks) divided by the frames one stored unit holds (Qwen-VL's
    temporal patch: 2), so ReKV's top 64 frames are 32 patches there."""
    options = dict(PRESETS[method])
    for knob in TOKEN_KNOBS:
        if options.get(knob):
            options[knob] = max(tokens_per_frame, round(options[knob] * tokens_per_frame / PAPER_TOKENS_PER_FRAME))
    for knob in BLOCK_KNOBS:
        if options.get(knob):
            options[knob] = max(1, round(options[knob] / frames_per_unit))
    return options


def make_config(method: str = "rekv", tokens_per_frame: int = PAPER_TOKENS_PER_FRAME, frames_per_unit: int = 1,
                **overrides) -> EngineConfig:
    """The preset `method` for a model with `tokens_per_frame` visual tokens per frame and
    `frames_per_unit` frames per stored block, with `overrides` applied; unknown knobs and bad
    values are ConfigErrors.

    Presets mean the same number of frames on every model: their token-valued knobs are scaled from
    the papers' 196 tokens per frame to the model's, their block counts from the papers' one frame
    per block. Overrides are taken as given (tokens, blocks)."""
    if method not in PRESETS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(PRESETS)}")
    for name, value in (("tokens_per_frame", tokens_per_frame), ("frames_per_unit", frames_per_unit)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return EngineConfig(**{**frame_scaled_options(method, tokens_per_frame, frames_per_unit), **overrides}).validate()
