"""Positions: where the engine places stored KV when it attends to it, and the model's RoPE there.

Keys are stored pre-RoPE; every attention places its context ([sinks | retrieved | window],
a segment, ...) anew and rotates at the positions the placement assigns:

- Rope (1-D RoPE, LLaVA-OneVision's Qwen2): the context sits at 0..C-1, the new tokens after it.
- TimestampedRope (Qwen3-VL, timestamped_positions.py): time written as text, not rotated.
- MRope (3-D M-RoPE, Qwen2.5-VL): text tokens advance (t, h, w) together; a run of visual units is
  one video: unit r of the run (its rank) takes the r-th temporal patch's positions of transformers'
  `get_vision_position_ids` (t = floor(r x second_per_grid_t x tokens_per_second), h and w its
  spatial grid), and text after the run resumes at its start + max(grid h, grid w), as
  `get_rope_index` does. With nothing dropped the ranks are the stream's patch indices, so the
  positions are transformers' own; with blocks retrieved, ranks are contiguous (ReKV's
  position-agnostic placement carried to the time axis): each retrieved unit keeps its spatial
  positions and takes temporal positions in stream order, as if the retrieved units were the video.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch

from pipeline.kv_store import KV, Visual

Positions = int | torch.Tensor  # contiguous from an int start, or explicit [3, T]


@dataclass
class Placement:
    context: Positions  # positions of the context tokens
    new: Positions  # positions of the new tokens that follow them
    next: int  # where a text token after all of them goes
    count: int  # context tokens

    def joined(self) -> Positions:
        """Positions of [context | new]."""
        return self.context if isinstance(self.context, int) else torch.cat([self.context, self.new], dim=1)

    def context_slice(self, start: int, end: int) -> Positions:
        return self.context + start if isinstance(self.context, int) else self.context[:, start:end]


class Rope:
    """1-D RoPE from the text model's own rotary module, over a cached cos/sin table."""

    def __init__(self, lm):
        self.lm = lm
        attention = lm.layers[0].self_attn
        self._rotate_half = sys.modules[type(attention).__module__].rotate_half  # its modeling file's helper
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin [positions, d]

    def table(self, end: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._table is None or self._table[0].shape[0] < end:
            size = max(end, 2 * (0 if self._table is None else self._table[0].shape[0]), 4096)
            cos, sin = self.lm.rotary_emb(like, torch.arange(size, device=like.device)[None])
            self._table = (cos[0], sin[0])
        return self._table

    def cos_sin(self, positions: Positions, count: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.table(positions + count, like)
        return cos[positions : positions + count], sin[positions : positions + count]

    @torch.inference_mode()
    def rotate(self, x: torch.Tensor, positions: Positions = 0) -> torch.Tensor:
        """The model's RoPE on x [..., heads, T, d] at `positions`: an int start (positions
        start..start+T-1 on every axis) or explicit [3, T]."""
        cos, sin = (t.to(x.dtype) for t in self.cos_sin(positions, x.shape[-2], x))
        return x * cos + self._rotate_half(x) * sin

    def place(self, parts: list[KV], new_tokens: int, new_units: list[int] | None = None,
              new_lengths: list[int] | None = None) -> Placement:
        """Positions of `parts` and of `new_tokens` after them (visual units `new_units` of
        `new_lengths` tokens each when ingesting; None: text)."""
        count = sum(k.shape[1] for k, _ in parts)
        return Placement(0, count, count + new_tokens, count)


class MRope(Rope):
    """3-D M-RoPE. `grid(units)` gives the relative positions [3, units x n] of that many
    consecutive temporal patches (transformers' get_vision_position_ids from 0); `span` is how far
    text after a video run starts from the run's start."""

    def __init__(self, lm, grid: Callable[[int], torch.Tensor], tokens_per_unit: int, span: int):
        super().__init__(lm)
        self.grid_fn, self.n, self.span = grid, tokens_per_unit, span
        self._grid = torch.empty(3, 0, dtype=torch.long)
        # which axis (t, h, w) rotates each of the d dims: probed from the model's rotary module,
        # so the sections (Qwen2.5-VL's blocks, Qwen3-VL's interleaving) are the model's own
        device = lm.rotary_emb.inv_freq.device
        probes = torch.eye(3, dtype=torch.long, device=device)[:, :, None, None]  # axis a at 1, others at 0
        moved = [lm.rotary_emb(torch.zeros(1, device=device), p)[1][0, 0] != 0 for p in probes]  # sin [d]
        self.dim_axis = torch.stack(moved).long().argmax(dim=0).cpu()  # [d]
        # the last few gathered (positions, cos, sin): every layer of a forward places its context
        # alike (ingest), so the gather and the copy to the device are done once per forward
        self._recent: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def cos_sin(self, positions, count, like):
        if isinstance(positions, int):
            return super().cos_sin(positions, count, like)
        for seen, cos, sin in self._recent:
            if seen.shape == positions.shape and cos.device == like.device and torch.equal(seen, positions):
                return cos, sin
        cos, sin = self.table(int(positions.max()) + 1, like)
        index = positions.to(cos.device)[self.dim_axis.to(cos.device)]  # [d, T]: each dim's axis
        dims = torch.arange(cos.shape[1], device=cos.device)[:, None]
        cos, sin = cos[index, dims].T, sin[index, dims].T
        self._recent = [(positions, cos, sin), *self._recent[:1]]  # a forward's two: queries, keys
        return cos, sin

    def grid(self, units: int) -> torch.Tensor:
        if self._grid.shape[1] < units * self.n:
            self._grid = self.grid_fn(max(units, 2 * self._grid.shape[1] // self.n, 64))
        return self._grid

    def place(self, parts, new_tokens, new_units=None, new_lengths=None):
        walk = _Walk(self)
        whole: list[int] = []  # uids of consecutive whole units, placed in one slice of the grid
        for part in parts:
            if isinstance(part, Visual) and isinstance(part.uid, int) and part.token_index is None and part[0].shape[1] == self.n:
                whole.append(part.uid)
                continue
            walk.units(whole)
            whole = []
            walk.visual(part.units(), part.index()) if isinstance(part, Visual) else walk.text(part[0].shape[1])
        walk.units(whole)
        context, count = walk.take(), sum(k.shape[1] for k, _ in parts)
        if new_units is not None:
            uids = torch.tensor(new_units).repeat_interleave(self.n)
            walk.visual(uids, torch.arange(self.n).repeat(len(new_units)))
        else:
            walk.text(new_tokens)
        new = walk.take()
        walk.close()
        return Placement(context, new, walk.cursor, count)


class _Walk:
    """Positions along a context, part by part (MRope.place)."""

    def __init__(self, rope: MRope):
        self.rope = rope
        self.cursor = 0  # next text position
        self.video_start: int | None = None  # start of the open run of visual units
        self.rank, self.last_uid = -1, None
        self.out: list[torch.Tensor] = []

    def close(self) -> None:
        if self.video_start is not None:
            self.cursor, self.video_start = self.video_start + self.rope.span, None

    def text(self, n: int) -> None:
        self.close()
        self.out.append(torch.arange(self.cursor, self.cursor + n).expand(3, -1))
        self.cursor += n

    def visual(self, uids: torch.Tensor, index: torch.Tensor) -> None:
        if self.video_start is None:
            self.video_start, self.rank, self.last_uid = self.cursor, -1, None
        if not len(uids):
            return
        starts = torch.ones_like(uids, dtype=torch.bool)
        starts[1:] = uids[1:] != uids[:-1]
        starts[0] = self.last_uid is None or int(uids[0]) != self.last_uid
        ranks = self.rank + starts.long().cumsum(0)  # [n] each token's unit rank in the run
        self.rank, self.last_uid = int(ranks[-1]), int(uids[-1])
        grid = self.rope.grid(self.rank + 1)
        self.out.append(grid[:, ranks * self.rope.n + index] + self.video_start)

    def units(self, uids: list[int]) -> None:
        """Whole units, each its own uid in turn: consecutive ranks, one slice of the grid."""
        if not uids:
            return
        if self.video_start is None:
            self.video_start, self.rank, self.last_uid = self.cursor, -1, None
        first = self.rank + (self.last_uid is None or uids[0] != self.last_uid)
        distinct = all(a != b for a, b in zip(uids, uids[1:]))
        if not distinct:  # the same unit twice in a row (not made by the engine): token by token
            n = self.rope.n
            return self.visual(torch.tensor(uids).repeat_interleave(n), torch.arange(n).repeat(len(uids)))
        self.rank, self.last_uid = first + len(uids) - 1, uids[-1]
        n = self.rope.n
        self.out.append(self.rope.grid(self.rank + 1)[:, first * n : (self.rank + 1) * n] + self.video_start)

    def take(self) -> torch.Tensor:
        out = torch.cat(self.out, dim=1) if self.out else torch.empty(3, 0, dtype=torch.long)
        self.out = []
        return out
