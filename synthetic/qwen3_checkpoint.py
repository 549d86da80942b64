"""Build small Qwen3-VL checkpoints (word-level tokenizer that splits digits, the real processor
classes, model) on local disk, like synthetic/qwen_checkpoint.py does for Qwen2.5-VL.

They are ordinary transformers checkpoints (`save_pretrained`), loaded by the engine through the
same code path as a Qwen3-VL release. What Qwen3-VL adds over Qwen2.5-VL is here too: interleaved
M-RoPE sections, timestamps written as text before each temporal patch (digits are tokens of their
own, as in Qwen's tokenizer, so a timestamp's token count grows with the time), and deepstack
(features of some vision layers added to the first language-model layers).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import (
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from synthetic.checkpoint import build_tokenizer, save_checkpoint
from synthetic.qwen_checkpoint import QWEN_CHAT_TEMPLATE, QWEN_SPECIALS

# Qwen/Qwen3-VL-*-Instruct's template renders a video part as Qwen2.5-VL's does
# (<|vision_start|><|video_pad|><|vision_end|>); its processor replaces that wrapper by one
# "<t seconds><|vision_start|>pads<|vision_end|>" per temporal patch.
QWEN3_CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE
TIMESTAMP_WORDS = ("<", ">", "seconds")  # "<12.5 seconds>": <, 1, 2, ., 5, seconds, >


@dataclass(frozen=True)
class Qwen3Spec:
    """Sizes of a small Qwen3-VL. Frames are processed at `frame_size` (a multiple of
    patch_size x merge 2), giving (frame_size / patch_size / 2)^2 visual tokens per temporal patch."""

    frame_size: int = 32
    patch_size: int = 4
    vision_hidden: int = 32
    vision_layers: int = 3
    vision_heads: int = 2
    vision_intermediate: int | None = None  # None: 2 x vision_hidden
    deepstack_layers: tuple[int, ...] = (0, 1)  # vision layers whose features feed LM layers 1, 2, ...
    text_hidden: int = 64
    text_layers: int = 3
    text_heads: int = 4
    text_kv_heads: int = 2
    head_dim: int = 16
    text_intermediate: int = 128
    mrope_section: tuple[int, int, int] = (4, 2, 2)  # of head_dim / 2 frequencies, interleaved
    rope_theta: float = 10000.0
    init_std: float = 0.02
    words: tuple[str, ...] = field(default_factory=tuple)
    seed: int = 0

    @property
    def tokens_per_patch(self) -> int:
        return (self.frame_size // self.patch_size // 2) ** 2


def build_qwen3_processor(spec: Qwen3Spec) -> Qwen3VLProcessor:
    tokenizer = build_tokenizer((*spec.words, *TIMESTAMP_WORDS), QWEN_SPECIALS, QWEN3_CHAT_TEMPLATE, digits=True)
    pixels = spec.frame_size * spec.frame_size
    # Qwen3-VL's video processor bounds a whole video's pixels (frames x height x width): the upper
    # bound is one temporal patch at frame_size, so the model's fixed frame size is frame_size
    # (pipeline/qwen3_vl.py); frames already at that size are processed with do_resize=False
    common = dict(patch_size=spec.patch_size, merge_size=2, temporal_patch_size=2)
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size={"shortest_edge": pixels, "longest_edge": pixels}, **common),
        video_processor=Qwen3VLVideoProcessor(size={"shortest_edge": pixels, "longest_edge": 2 * pixels}, **common,
                                              cap_pixels_per_frame=False),
        tokenizer=tokenizer,
        chat_template=QWEN3_CHAT_TEMPLATE,
    )


def build_qwen3_config(spec: Qwen3Spec, tokenizer) -> Qwen3VLConfig:
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in
           zip(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"), QWEN_SPECIALS)}
    side = spec.frame_size // spec.patch_size
    vision = dict(
        depth=spec.vision_layers, hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate or spec.vision_hidden * 2,
        num_heads=spec.vision_heads, patch_size=spec.patch_size, spatial_merge_size=2, temporal_patch_size=2,
        out_hidden_size=spec.text_hidden, num_position_embeddings=side * side,
        deepstack_visual_indexes=list(spec.deepstack_layers), initializer_range=spec.init_std,
    )
    text = dict(
        vocab_size=len(tokenizer), hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads, head_dim=spec.head_dim, max_position_embeddings=1 << 20,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta,
                         "mrope_section": list(spec.mrope_section), "mrope_interleaved": True},
        initializer_range=spec.init_std, pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen3VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=False, **ids)


def build_qwen3_checkpoint(out_dir: str | Path, spec: Qwen3Spec = Qwen3Spec()) -> Path:
    """Write a randomly initialised (seeded) Qwen3-VL checkpoint + processor to `out_dir`."""
    processor = build_qwen3_processor(spec)
    config = build_qwen3_config(spec, processor.tokenizer)
    return save_checkpoint(out_dir, Qwen3VLForConditionalGeneration, config, processor, spec.seed, json.dumps(asdict(spec), indent=1))
