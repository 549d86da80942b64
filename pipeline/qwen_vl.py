"""The model adapter for Qwen2.5-VL: what differs from LLaVA-OneVision's (model.py).

- A unit is one temporal patch: 2 frames encoded together by the checkpoint's own video processor
  and visual tower (`get_video_features`), (S / patch / 2)^2 tokens. The session pairs frames
  (a temporal patch waits for its second frame; a question flushes a lone last frame, which the
  processor pads by repeating it).
- Frames are encoded at one fixed square size S per model (the processor's resize of 448 x 448,
  within its pixel bounds), so every unit has the same token count; frames of another size are
  resized to S x S first (bicubic, antialiased), as LLaVA-OneVision squares them.
- Positions are 3-D M-RoPE (positions.MRope) with time spaced by second_per_grid_t x
  tokens_per_second, second_per_grid_t = 2 / the stream's frame_rate.
- No separator embedding after the video: the template's <|vision_end|> is text.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize

from pipeline.model import ModelDims, VideoLLM
from pipeline.positions import MRope

NOMINAL_SIZE = 448  # the square side frames are encoded at, before the processor's pixel bounds (chosen)


class QwenVL(VideoLLM):
    family = "qwen2_5_vl"

    def __init__(self, model, processor, name: str):
        video = processor.video_processor
        self.patch, self.merge, self.temporal = video.patch_size, video.merge_size, video.temporal_patch_size
        self._frame_size = smart_resize(NOMINAL_SIZE, NOMINAL_SIZE, factor=self.patch * self.merge,
                                        min_pixels=video.size["shortest_edge"], max_pixels=video.size["longest_edge"])[0]
        super().__init__(model, processor, name)
        self._ropes: dict[float, MRope] = {}

    @property
    def frame_size(self) -> int:
        return self._frame_size

    def _dims(self, text_config) -> ModelDims:
        side = self.frame_size // self.patch // self.merge  # merged tokens per side
        return ModelDims.of(text_config, tokens_per_unit=side * side, frames_per_unit=self.temporal)

    def rope(self, frame_rate: float) -> MRope:
        if frame_rate not in self._ropes:
            grid_side = self.frame_size // self.patch  # patches per side, before merging
            seconds_per_patch = torch.tensor(self.temporal / frame_rate)  # as the processor's second_per_grid_ts
            interval = self.model.config.vision_config.tokens_per_second * seconds_per_patch

            def grid(units: int) -> torch.Tensor:  # transformers' own vision positions, from 0
                thw = torch.tensor([units, grid_side, grid_side])
                return self.model.model.get_vision_position_ids(0, thw, 1, self.merge, interval)

            self._ropes[frame_rate] = MRope(self.lm, grid, self.dims.tokens_per_unit, span=grid_side // self.merge)
        return self._ropes[frame_rate]

    def prepare_frames(self, frames) -> np.ndarray:
        """uint8 frames [T, H, W, 3] (or a list of [H, W, 3]) at S x S."""
        out = []
        for frame in frames:
            if frame.shape[:2] != (self.frame_size, self.frame_size):
                x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float()
                x = F.interpolate(x, size=(self.frame_size,) * 2, mode="bicubic", antialias=True, align_corners=False)
                frame = x.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
            out.append(frame)
        return np.stack(out)

    @torch.inference_mode()
    def encode_frames(self, frames, batch_size: int = 32) -> torch.Tensor:
        """uint8 frames [T, H, W, 3] -> visual tokens [ceil(T / 2), tokens_per_unit, hidden], one row
        per temporal patch (an odd last frame is padded by repetition, as the processor does)."""
        frames = self.prepare_frames(frames)
        batch_size += batch_size % self.temporal  # whole temporal patches per call
        out = []
        for start in range(0, len(frames), batch_size):
            inputs = self.processor.video_processor(
                videos=[frames[start : start + batch_size]], return_tensors="pt", do_sample_frames=False,
                cap_pixels_per_frame=False,
            )
            pixels = inputs["pixel_values_videos"].to(self.device, self.dtype)  # [t * h * w, patch dim]
            grid = inputs["video_grid_thw"].to(self.device)  # [1, 3]
            features = self.model.model.get_video_features(pixels, grid, return_dict=True).pooler_output[0]
            out.append(features.reshape(-1, self.dims.tokens_per_unit, self.dims.hidden))
        return torch.cat(out)

    @cached_property
    def newline_embedding(self) -> torch.Tensor:
        return torch.empty(0, self.dims.hidden, device=self.device, dtype=self.dtype)  # [0, hidden]
