"""The model adapter for Qwen3-VL: what differs from Qwen2.5-VL's (qwen_vl.py).

- A unit is still one temporal patch of 2 frames (a patch waits for its second frame; a question
  flushes a lone last frame, which the processor pads by repeating it), encoded by the
  checkpoint's own video processor and `get_video_features`.
- Time is text: the processor writes "<t seconds>" before each patch (t the mean time of its two
  frames, one decimal) and wraps the patch in <|vision_start|> ... <|vision_end|>. A unit's stored
  tokens are therefore [timestamp text, <|vision_start|>, visual tokens, <|vision_end|>]: units
  vary in length with their timestamp's digits (`unit_inputs`). The chat template's single
  <|vision_start|><|video_pad|><|vision_end|> becomes the bare sequence of units, as the processor
  collapses it (`prompt_parts`).
- Positions: TimestampedRope (timestamped_positions.py), interleaved M-RoPE sections.
- Deepstack: features of some vision layers are added to the hidden states after the first
  language-model layers at visual token positions; the engine passes them to the model's own
  language model (visual_pos_masks, deepstack_visual_embeds) for each forward over units.
- Frames are encoded at one fixed square size S per model: the processor's size for one temporal
  patch of 448 x 448 (its pixel bounds count a whole video's frames, so a fixed size keeps a
  frame's tokens independent of how many frames are encoded at once); frames are squared to S by
  prepare_frames and processed with do_resize=False.
"""

from __future__ import annotations

from functools import cached_property

import torch
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

from pipeline.model import PromptParts, UnitInputs, VideoLLM
from pipeline.qwen_vl import NOMINAL_SIZE, QwenVL
from pipeline.timestamped_positions import TimestampedRope


class Qwen3VL(QwenVL):
    family = "qwen3_vl"

    def __init__(self, model, processor, name: str):
        video = processor.video_processor
        self.patch, self.merge, self.temporal = video.patch_size, video.merge_size, video.temporal_patch_size
        self._frame_size = smart_resize(self.temporal, NOMINAL_SIZE, NOMINAL_SIZE, temporal_factor=self.temporal,
                                        factor=self.patch * self.merge, min_pixels=video.size["shortest_edge"],
                                        max_pixels=video.size["longest_edge"])[0]
        VideoLLM.__init__(self, model, processor, name)
        self.side = self.frame_size // self.patch // self.merge  # merged tokens per side
        self.vision_start, self.vision_end = processor.vision_start_token_id, processor.vision_end_token_id

    def rope(self, frame_rate: float) -> TimestampedRope:
        """Time is in the units' text, so every frame rate places alike."""
        return self._timed_rope

    @cached_property
    def _timed_rope(self) -> TimestampedRope:
        # built when first used: it probes the rotary module, which a model on the meta device
        # (load_dims: the compressor actor's shapes) cannot run
        return TimestampedRope(self.lm, self.dims.tokens_per_unit, self.side)

    # ---- text -------------------------------------------------------------------------------
    def prompt_parts(self, system_prompt, question) -> PromptParts:
        """The template's <|vision_start|><|video_pad|><|vision_end|> wrapper is dropped, as the
        processor does: each unit carries its own markers."""
        parts = super().prompt_parts(system_prompt, question)
        prefix, suffix = parts.prefix_ids, parts.suffix_ids
        if prefix[-1:] == [self.vision_start] and suffix[:1] == [self.vision_end]:
            prefix, suffix = prefix[:-1], suffix[1:]
        return PromptParts(prefix_ids=prefix, suffix_ids=suffix)

    def timestamp_ids(self, times: tuple[float, float]) -> list[int]:
        """"<t seconds>" then <|vision_start|>: the unit's text before its visual tokens, t the mean
        of its first and last frame's time (the processor's, for a padded lone frame too)."""
        seconds = (times[0] + times[1]) / 2
        return [*self.tokenize(f"<{seconds:.1f} seconds>"), self.vision_start]

    # ---- vision -----------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_units(self, frames, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 frames [T, H, W, 3] -> visual tokens [ceil(T / 2), n, hidden] and deepstack
        features [ceil(T / 2), k, n, hidden], one row per temporal patch (an odd last frame is
        padded by repetition, as the processor does)."""
        frames = self.prepare_frames(frames)
        batch_size += batch_size % self.temporal  # whole temporal patches per call
        tokens, deepstack = [], []
        n, hidden = self.dims.tokens_per_unit, self.dims.hidden
        for start in range(0, len(frames), batch_size):
            inputs = self.processor.video_processor(
                videos=[frames[start : start + batch_size]], return_tensors="pt", do_sample_frames=False,
                do_resize=False, cap_pixels_per_frame=False,
            )
            pixels = inputs["pixel_values_videos"].to(self.device, self.dtype)  # [t * h * w, patch dim]
            grid = inputs["video_grid_thw"].to(self.device)  # [1, 3]
            out = self.model.model.get_video_features(pixels, grid, return_dict=True)
            tokens.append(out.pooler_output[0].reshape(-1, n, hidden))
            layers = torch.stack([f[0] for f in out.deepstack_features])  # [k, t * n, hidden]
            deepstack.append(layers.reshape(len(layers), -1, n, hidden).transpose(0, 1))
        return torch.cat(tokens), torch.cat(deepstack)

    def encode_frames(self, frames, batch_size: int = 32) -> torch.Tensor:
        """Visual tokens only [ceil(T / 2), n, hidden] (the deepstack features: encode_units)."""
        return self.encode_units(frames, batch_size)[0]

    def unit_inputs(self, units) -> UnitInputs:
        """[timestamp text, <|vision_start|>, visual tokens, <|vision_end|>] per unit, as the
        processor renders a video, with the deepstack features at the visual tokens."""
        embeds, lengths, mask, deepstack = [], [], [], []
        end = self.embed([self.vision_end])
        for tokens, times, features in units:
            before = self.embed(self.timestamp_ids(times))
            embeds += [before, tokens.to(before.dtype), end]
            lengths.append(len(before) + len(tokens) + 1)
            mask += [False] * len(before) + [True] * len(tokens) + [False]
            deepstack.append(features)
        return UnitInputs(torch.cat(embeds), lengths, torch.tensor(mask, device=self.device),
                          torch.cat(deepstack, dim=1))  # [k, visual tokens, hidden]
