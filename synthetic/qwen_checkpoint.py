"""Build small Qwen2.5-VL checkpoints (word-level tokenizer, the real processor classes, model) on
local disk, like synthetic/checkpoint.py does for LLaVA-OneVision.

They are ordinary transformers checkpoints (`save_pretrained`), loaded by the engine through the
same code path as a Qwen2.5-VL release.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from synthetic.checkpoint import build_tokenizer, save_checkpoint

QWEN_SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# The layout of Qwen/Qwen2.5-VL-*-Instruct's chat template: a default system turn when none is
# given; each vision part is <|vision_start|><|..._pad|><|vision_end|>, in the order given.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class QwenSpec:
    """Sizes of a small Qwen2.5-VL. Frames are processed at `frame_size` (a multiple of
    patch_size x merge 2), giving (frame_size / patch_size / 2)^2 tokens per temporal patch."""

    frame_size: int = 32
    patch_size: int = 4
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int | None = None  # None: 2 x vision_hidden
    window_size: int | None = None  # vision window attention (px); None: 4 patches
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    mrope_section: tuple[int, int, int] = (2, 3, 3)  # halves of head_dim: sums to head_dim / 2
    tokens_per_second: int = 2
    rope_theta: float = 10000.0
    init_std: float = 0.02
    words: tuple[str, ...] = field(default_factory=tuple)
    seed: int = 0

    @property
    def tokens_per_patch(self) -> int:
        return (self.frame_size // self.patch_size // 2) ** 2


def build_qwen_processor(spec: QwenSpec) -> Qwen2_5_VLProcessor:
    tokenizer = build_tokenizer(spec.words, QWEN_SPECIALS, QWEN_CHAT_TEMPLATE)
    pixels = spec.frame_size * spec.frame_size
    # min = max pixels: every frame is resized to about frame_size^2 pixels, whatever the stream;
    # no per-video pixel cap (it would make a frame's tokens depend on the video's length)
    size = {"shortest_edge": pixels, "longest_edge": pixels}
    common = dict(size=size, patch_size=spec.patch_size, merge_size=2, temporal_patch_size=2)
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**common),
        video_processor=Qwen2VLVideoProcessor(**common, cap_pixels_per_frame=False),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def build_qwen_config(spec: QwenSpec, tokenizer) -> Qwen2_5_VLConfig:
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in
           zip(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"), QWEN_SPECIALS)}
    vision = dict(
        depth=spec.vision_layers, hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate or spec.vision_hidden * 2,
        num_heads=spec.vision_heads, patch_size=spec.patch_size, spatial_merge_size=2, temporal_patch_size=2,
        tokens_per_second=spec.tokens_per_second, window_size=spec.window_size or spec.patch_size * 4,
        out_hidden_size=spec.text_hidden, initializer_range=spec.init_std,
        fullatt_block_indexes=list(range(7, spec.vision_layers, 8)) or [spec.vision_layers - 1],  # 7B: 7, 15, 23, 31
    )
    text = dict(
        vocab_size=len(tokenizer), hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads, max_position_embeddings=1 << 20,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta, "mrope_section": list(spec.mrope_section)},
        initializer_range=spec.init_std, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=False, **ids)


def build_qwen_checkpoint(out_dir: str | Path, spec: QwenSpec = QwenSpec()) -> Path:
    """Write a randomly initialised (seeded) Qwen2.5-VL checkpoint + processor to `out_dir`."""
    processor = build_qwen_processor(spec)
    config = build_qwen_config(spec, processor.tokenizer)
    return save_checkpoint(out_dir, Qwen2_5_VLForConditionalGeneration, config, processor, spec.seed, json.dumps(asdict(spec), indent=1))
