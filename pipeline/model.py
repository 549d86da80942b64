"""The model adapter: a LLaVA-OneVision checkpoint seen as the pieces the streaming engine needs
(Qwen2.5-VL's differences live in qwen_vl.py, Qwen3-VL's in qwen3_vl.py, positions in positions.py
and timestamped_positions.py).

Everything runs through the checkpoint's own modules: its processor and `get_video_features` for
visual tokens, its decoder layers for every forward, its rotary embedding for positions. The one
extension is an attention function registered with transformers' `AttentionInterface`
(see attention.py): when a forward carries a `streamkv_plan`, attention is computed by that plan
over the engine's KV; without one it is plain SDPA, so the model stays an ordinary model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, LlavaOnevisionForConditionalGeneration

from pipeline.attention import ATTENTION_NAME, AttentionPlan, register_attention
from pipeline.conversation import Conversation
from pipeline.errors import InvalidInputError, UnsupportedModelError
from pipeline.positions import Rope

SUPPORTED_MODEL_TYPES = ("llava_onevision", "qwen2_5_vl", "qwen3_vl")


@dataclass(frozen=True)
class ModelDims:
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    tokens_per_unit: int  # tokens of one stored unit (block): a frame, or Qwen-VL's temporal patch
    frames_per_unit: int = 1  # frames one unit encodes (Qwen-VL: 2, its temporal patch)

    @classmethod
    def of(cls, text_config, tokens_per_unit: int, frames_per_unit: int = 1) -> "ModelDims":
        """The language model's shape from its transformers config, with the visual unit's size."""
        return cls(
            layers=text_config.num_hidden_layers,
            q_heads=text_config.num_attention_heads,
            kv_heads=text_config.num_key_value_heads,
            head_dim=getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads,
            hidden=text_config.hidden_size,
            tokens_per_unit=tokens_per_unit,
            frames_per_unit=frames_per_unit,
        )

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def tokens_per_frame(self) -> int:
        """Visual tokens per frame (rounded up): the unit the presets' token knobs scale by."""
        return math.ceil(self.tokens_per_unit / self.frames_per_unit)


@dataclass(frozen=True)
class PromptParts:
    """The chat-templated prompt cut around the video placeholder.

    prefix_ids: tokens before the video (system turn and user-turn header): the attention sinks.
    suffix_ids: tokens after the video placeholder (question, end of turn, assistant header);
    the video's trailing newline embedding goes first, before them.
    """

    prefix_ids: list[int]
    suffix_ids: list[int]


@dataclass
class UnitInputs:
    """What the language model takes for a run of units (a segment's frames and summary, or the
    uniform baseline's sampled patches): one row per stored token.

    embeds [T, hidden]: the units end to end; lengths: tokens of each unit (LLaVA-OneVision,
    Qwen2.5-VL: its visual tokens; Qwen3-VL: timestamp text, visual tokens and vision markers);
    visual_mask [T] (bool) and deepstack [k, visual tokens, hidden]: Qwen3-VL's deepstack features
    for the first k layers, None elsewhere.
    """

    embeds: torch.Tensor
    lengths: list[int]
    visual_mask: torch.Tensor | None = None
    deepstack: torch.Tensor | None = None

    def offsets(self) -> list[int]:
        """Start of each unit in `embeds`, and the end."""
        out = [0]
        for n in self.lengths:
            out.append(out[-1] + n)
        return out


class VideoLLM:
    """A loaded checkpoint: model, processor and the operations the engine performs with them."""

    family = "llava_onevision"

    def __init__(self, model: LlavaOnevisionForConditionalGeneration, processor, name: str):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.name = name
        self.lm = model.model.language_model
        self.device = model.device
        self.dtype = model.dtype
        self.dims = self._dims(model.config.text_config)
        self.scaling = self.lm.layers[0].self_attn.scaling
        self._rope = Rope(self.lm)
        eos = model.generation_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else eos)

    def _dims(self, text_config) -> ModelDims:
        vision = self.model.config.vision_config
        patches = vision.image_size // vision.patch_size
        return ModelDims.of(text_config, tokens_per_unit=math.ceil(patches / 2) ** 2)

    def rope(self, frame_rate: float) -> Rope:
        """Positions and rotation for a stream sampled at `frame_rate` (1-D RoPE ignores it)."""
        return self._rope

    # ---- text -------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_parts(self, system_prompt: str | None, question: str | Conversation) -> PromptParts:
        conversation = question if isinstance(question, Conversation) else Conversation(question)
        text = self.processor.apply_chat_template(conversation.messages(system_prompt), add_generation_prompt=True)
        ids = self.tokenizer(text)["input_ids"]
        video_id = self.processor.video_token_id
        if ids.count(video_id) != 1:
            raise UnsupportedModelError("the chat template must render exactly one video placeholder")
        cut = ids.index(video_id)
        return PromptParts(prefix_ids=ids[:cut], suffix_ids=ids[cut + 1 :])

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # ---- vision -----------------------------------------------------------------------------
    @property
    def frame_size(self) -> int:
        """The square side (px) frames are encoded at."""
        return self.model.config.vision_config.image_size

    def prepare_frames(self, frames: np.ndarray) -> np.ndarray:
        """Frames as the stream keeps them until encoded (LLaVA-OneVision: as given)."""
        return frames

    @torch.inference_mode()
    def encode_frames(self, frames: np.ndarray, batch_size: int = 32) -> torch.Tensor:
        """uint8 frames [T, H, W, 3] -> visual tokens [T, tokens_per_frame, hidden] (LM input space).

        The checkpoint's own video processor and `get_video_features` (tower, projector, 2x2 pooling);
        the trailing newline embedding that recent transformers append there (5.17 appends it
        in forward instead) is dropped here and added at question time.
        """
        out = []
        config = self.model.config
        for start in range(0, len(frames), batch_size):
            pixels = self.processor.video_processor(videos=[frames[start : start + batch_size]], return_tensors="pt")
            pixels = pixels["pixel_values_videos"].to(self.device, self.dtype)  # [1, t, 3, S, S]
            features = self.model.model.get_video_features(
                pixels,
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
                return_dict=True,
            ).pooler_output[:, : pixels.shape[1] * self.dims.tokens_per_frame]  # [1, t * n, hidden]
            out.append(features.reshape(-1, self.dims.tokens_per_frame, self.dims.hidden))
        return torch.cat(out)

    def encode_units(self, frames: np.ndarray, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Visual tokens [U, tokens_per_unit, hidden] of the frames' units and their deepstack
        features [U, k, tokens_per_unit, hidden] (Qwen3-VL; None for models without deepstack)."""
        return self.encode_frames(frames, batch_size), None

    def unit_inputs(self, units: list[tuple[torch.Tensor, tuple[float, float], torch.Tensor | None]]) -> UnitInputs:
        """The LM input of consecutive units, each (visual tokens [n, hidden], its (first, last)
        time in seconds, its deepstack features or None): here the visual tokens alone."""
        return UnitInputs(torch.cat([tokens for tokens, _, _ in units]), [len(tokens) for tokens, _, _ in units])

    @cached_property
    def newline_embedding(self) -> torch.Tensor:
        return self.model.model.image_newline.detach()[None]  # [1, hidden]

    @torch.inference_mode()
    def embed(self, token_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        return self.lm.embed_tokens(ids)  # [T, hidden]

    # ---- language model ---------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, embeds: torch.Tensor, plan: AttentionPlan, visual_mask: torch.Tensor | None = None,
                deepstack: torch.Tensor | None = None) -> torch.Tensor:
        """Run the LM's layers over `embeds` [T, hidden] with attention done by `plan`.

        Positions are given as zeros so the layers' own rotary step is the identity: the plan
        receives pre-RoPE queries and keys and applies rotation itself at the positions it assigns.
        visual_mask [T] / deepstack [k, visual tokens, hidden]: Qwen3-VL's deepstack, which its
        own language model adds after each of its first k layers (UnitInputs).
        Returns the final normed hidden states [T, hidden].
        """
        positions = torch.zeros(1, embeds.shape[0], dtype=torch.long, device=self.device)
        # the plan does the masking (Qwen3-VL's language model takes no per-kind mapping: it builds
        # a causal mask, unused)
        layer_types = getattr(self.lm.config, "layer_types", None)
        masks = {kind: None for kind in set(layer_types)} if layer_types else None
        extra = {}
        if deepstack is not None:
            extra = {"visual_pos_masks": visual_mask[None].to(self.device),
                     "deepstack_visual_embeds": list(deepstack.to(self.device, self.dtype))}
        out = self.lm(
            inputs_embeds=embeds[None].to(self.dtype),
            position_ids=positions,
            attention_mask=masks,
            use_cache=False,
            streamkv_plan=plan,
            **extra,
        )
        return out.last_hidden_state[0]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()


def _checkpoint_config(path: Path):
    """The checkpoint directory's transformers config, if it is a model family the engine supports."""
    if not (path / "config.json").is_file():
        raise UnsupportedModelError(f"{path} is not a checkpoint directory (no config.json)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{path} is a {config.model_type!r} checkpoint; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return config


def load_model(path: str | Path, device: str = "cpu", dtype: torch.dtype | str | None = None) -> VideoLLM:
    """Load a LLaVA-OneVision, Qwen2.5-VL or Qwen3-VL checkpoint (model + its own processor and chat
    template) from a local directory, offline.

    dtype defaults to float32 on CPU and bfloat16 on CUDA.
    """
    path = Path(path)
    config = _checkpoint_config(path)
    if getattr(config.text_config, "use_sliding_window", False):
        raise UnsupportedModelError("sliding-window language models are not supported")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise InvalidInputError("dtype must be a torch dtype name such as 'float32' or 'bfloat16'")
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=True)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return wrap_model(model.to(device), processor, name=path.name)


def load_dims(path: str | Path) -> ModelDims:
    """The checkpoint's ModelDims without its weights: the model is built on the meta device (no
    memory), through the same adapter as load_model, so the shapes cannot disagree. For actors
    that need the shapes but run no model (the segmenter/compressor actor)."""
    path = Path(path)
    config = _checkpoint_config(path)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return wrap_model(model, AutoProcessor.from_pretrained(path, local_files_only=True), name=path.name).dims


def wrap_model(model, processor, name: str) -> VideoLLM:
    """A VideoLLM over an already built model (e.g. random weights for a benchmark)."""
    from pipeline.qwen3_vl import Qwen3VL  # they build on VideoLLM
    from pipeline.qwen_vl import QwenVL

    register_attention()
    model.set_attn_implementation({"text_config": ATTENTION_NAME, "vision_config": "sdpa"})
    family = {"qwen2_5_vl": QwenVL, "qwen3_vl": Qwen3VL}.get(model.config.model_type, VideoLLM)
    return family(model.eval(), processor, name=name)
