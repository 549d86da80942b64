"""Build small LLaVA-OneVision checkpoints (word-level tokenizer, processor, model) on local disk.

Model weights cannot be downloaded here, so tests and the demo model use checkpoints made by this
module. They are ordinary transformers checkpoints (`save_pretrained`), loaded by the engine through
the same code path as a real LLaVA-OneVision release.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

SPECIAL_TOKENS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

# The layout of llava-hf/llava-onevision-qwen2-*-ov-hf's template: images, then videos, then text,
# each turn wrapped in <|im_start|>role ... <|im_end|>. Content may be a string or a list of parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'video' %}{{ '<video>\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

BASE_WORDS = (
    "system user assistant you are a helpful . , ? ! : ( ) ' - \n what which who where when how is was were "
    "the of in on at and or not yes no it this that there color shape object frame video"
).split(" ")


@dataclass(frozen=True)
class CheckpointSpec:
    """Sizes of a small LLaVA-OneVision."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    rope_theta: float = 10000.0
    max_positions: int = 1 << 20
    init_std: float = 0.02  # weight init scale; tests use larger values so random models vary
    words: tuple[str, ...] = field(default_factory=tuple)
    seed: int = 0

    @property
    def tokens_per_frame(self) -> int:
        return math.ceil(self.image_size / self.patch_size / 2) ** 2


def build_tokenizer(words: tuple[str, ...] = (), specials: tuple[str, ...] = (), chat_template: str = CHAT_TEMPLATE,
                    digits: bool = False) -> PreTrainedTokenizerFast:
    """A lowercase word-level tokenizer: words, single punctuation marks and newlines are tokens.

    `specials`: further special tokens (a model family's vision markers), kept whole and unlowered.
    `digits`: every digit is a token of its own (as Qwen's tokenizers split numbers), so a number's
    token count grows with its digits.
    """
    vocab: dict[str, int] = {}
    specials = (*SPECIAL_TOKENS, *specials)
    for token in [*specials, *BASE_WORDS, *words, *("0123456789" if digits else "")]:
        vocab.setdefault(token.lower() if token not in specials else token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
            pre_tokenizers.Punctuation(behavior="isolated"),
            *([pre_tokenizers.Digits(individual_digits=True)] if digits else []),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|im_end|>",
        extra_special_tokens=[t for t in specials if t not in ("<pad>", "<unk>", "<|im_end|>")],
        chat_template=chat_template,
        model_max_length=1 << 20,
    )


def build_processor(spec: CheckpointSpec) -> LlavaOnevisionProcessor:
    tokenizer = build_tokenizer(spec.words)
    size = {"height": spec.image_size, "width": spec.image_size}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size=size, image_grid_pinpoints=[[spec.image_size, spec.image_size]]
        ),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tokenizer,
        num_image_tokens=(spec.image_size // spec.patch_size) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
    )


def build_config(spec: CheckpointSpec, tokenizer: PreTrainedTokenizerFast) -> LlavaOnevisionConfig:
    vision = SiglipVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        vision_use_head=False,
        initializer_range=spec.init_std,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        initializer_range=spec.init_std,
    )
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=[[spec.image_size, spec.image_size]],
    )


def build_checkpoint(out_dir: str | Path, spec: CheckpointSpec = CheckpointSpec()) -> Path:
    """Write a randomly initialised (seeded) checkpoint + processor to `out_dir` and return it."""
    processor = build_processor(spec)
    config = build_config(spec, processor.tokenizer)
    return save_checkpoint(out_dir, LlavaOnevisionForConditionalGeneration, config, processor, spec.seed,
                           _spec_json(spec))


def save_checkpoint(out_dir: str | Path, model_class, config, processor, seed: int, spec_json: str) -> Path:
    """`model_class(config)` with seeded random weights, its processor and the spec that made
    them, written to `out_dir` as a checkpoint load_model reads (every model family's builder)."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "streamkv_spec.json").write_text(spec_json)
    return out_dir


def _spec_json(spec: CheckpointSpec) -> str:
    import json

    return json.dumps(asdict(spec), indent=1)
