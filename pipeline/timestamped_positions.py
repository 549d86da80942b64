"""Positions for Qwen3-VL: M-RoPE where time is written as text, not rotated.

Qwen3-VL's processor renders each temporal patch as "<t seconds><|vision_start|>" + its visual
tokens + "<|vision_end|>", and `get_rope_index` treats every patch as an image of its own: text
tokens advance (t, h, w) together; a patch's visual tokens take t = the cursor and (h, w) = the
cursor + their row and column; text after it resumes at the cursor + max(rows, cols). So a
stored unit (timestamp text, markers, visual tokens: `UnitInputs`) has positions relative to its
own start that depend only on its timestamp's token count; the unit spans
prefix + side + 1 positions (prefix: timestamp tokens and <|vision_start|>; then the visual
block's `side`; then <|vision_end|>).

Placement (ReKV's position-agnostic rule, carried over): the context's parts are laid end to end
in the order given, each unit at the next free position with its own relative layout. With
nothing dropped that is transformers' own layout; with blocks retrieved, the retrieved units sit
contiguously in stream order, so their temporal positions are in order, each keeps its spatial
offsets, and the time it shows is its own timestamp text, which travels with the unit's KV.
Tokens of a unit kept in part (LiveVLM's long-term memory) keep their place in their unit, and
a unit present in any part spans its whole width (docs/METHODS.md).
"""

from __future__ import annotations

import torch

from pipeline.kv_store import Visual
from pipeline.positions import MRope, Placement


class TimestampedRope(MRope):
    """Qwen3-VL's M-RoPE (interleaved sections, probed from the model's rotary module by MRope).
    `n`: visual tokens per unit, `side`: merged tokens per side of a (square) frame."""

    def __init__(self, lm, tokens_per_unit: int, side: int):
        super().__init__(lm, grid=None, tokens_per_unit=tokens_per_unit, span=side)
        self.side = side
        self._layouts: dict[int, torch.Tensor] = {}  # prefix -> [3, prefix + n + 1]
        self._recent_runs: tuple = ()  # ((cursor, lengths, run()), ...): see run

    def layout(self, prefix: int) -> torch.Tensor:
        """Positions [3, L] of a whole unit's tokens relative to its start."""
        if prefix not in self._layouts:
            offsets = torch.arange(prefix + self.n + 1)
            self._layouts[prefix] = self.relative(offsets, torch.full_like(offsets, prefix))
        return self._layouts[prefix]

    def relative(self, offsets: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Positions [3, T] of tokens at `offsets` in their units, relative to the unit's start,
        given each token's unit's `prefix` (text tokens before its visual block)."""
        k = (offsets - prefix).clamp(0, self.n - 1)  # index in the visual block
        before, visual = offsets < prefix, (offsets >= prefix) & (offsets < prefix + self.n)
        end = prefix + self.side  # <|vision_end|>
        rows = torch.where(before, offsets, torch.where(visual, prefix + k // self.side, end))
        cols = torch.where(before, offsets, torch.where(visual, prefix + k % self.side, end))
        time = torch.where(before, offsets, torch.where(visual, prefix, end))
        return torch.stack([time, rows, cols])

    def run(self, cursor: int, lengths: list[int]) -> tuple[torch.Tensor, int, int]:
        """Positions [3, sum(lengths)] of whole units laid end to end from `cursor`, the last
        unit's start, and the next free position. Every layer of a forward places the same run,
        and each ingest forward's run extends the previous one's (the window grows by a segment),
        so the last few runs are kept and only new units are computed."""
        recent = self._recent_runs  # (cursor, lengths, result), newest first: a context's run and the new units'
        for cached_cursor, cached_lengths, cached in recent:
            if cached_cursor == cursor and cached_lengths == lengths:
                return cached
        result = None
        for cached_cursor, cached_lengths, cached in recent:
            if cached_cursor == cursor and cached_lengths and lengths[: len(cached_lengths)] == cached_lengths:
                head, _, end = cached
                tail, last, end = self._run(end, lengths[len(cached_lengths) :])
                result = (torch.cat([head, tail], dim=1), last, end)
                break
        result = result or self._run(cursor, lengths)
        self._recent_runs = ((cursor, lengths, result), *recent[:2])  # replaced whole: safe across threads
        return result

    def _run(self, cursor: int, lengths: list[int]) -> tuple[torch.Tensor, int, int]:
        sizes = torch.tensor(lengths)
        prefix = sizes - self.n - 1
        span = prefix + self.side + 1
        starts = cursor + span.cumsum(0) - span  # [U]
        unit_of = torch.repeat_interleave(torch.arange(len(lengths)), sizes)  # [T]
        offsets = torch.arange(len(unit_of)) - (sizes.cumsum(0) - sizes)[unit_of]
        positions = self.relative(offsets, prefix[unit_of]) + starts[unit_of]
        return positions, int(starts[-1]), int(starts[-1] + span[-1])

    def place(self, parts, new_tokens, new_units=None, new_lengths=None):
        walk = _Walk(self)
        run: list[tuple[int, int]] = []  # consecutive whole units (uid, length), placed at once
        for part in parts:
            if isinstance(part, Visual) and isinstance(part.uid, int) and part.token_index is None:
                run.append((part.uid, part[0].shape[1]))
                continue
            walk.units(run)
            run = []
            if isinstance(part, Visual):
                walk.tokens(part.units(), part.index(), part.unit_lengths())
            else:
                walk.text(part[0].shape[1])
        walk.units(run)
        context, count = walk.take(), sum(k.shape[1] for k, _ in parts)
        if new_units is not None:
            walk.units(list(zip(new_units, new_lengths or [self.n + 2] * len(new_units))))
        else:
            walk.text(new_tokens)
        return Placement(context, walk.take(), walk.cursor, count)


class _Walk:
    """Positions along a context, part by part (TimestampedRope.place)."""

    def __init__(self, rope: TimestampedRope):
        self.rope = rope
        self.cursor = 0  # next free position
        self.last_uid: int | None = None  # the unit the last placed token belongs to
        self.open_start = 0  # that unit's start
        self.out: list[torch.Tensor] = []

    def text(self, n: int) -> None:
        self.out.append(torch.arange(self.cursor, self.cursor + n).expand(3, -1))
        self.cursor += n
        self.last_uid = None

    def units(self, run: list[tuple[int, int]]) -> None:
        """Whole units (uid, stored tokens), one after another."""
        if not run:
            return
        positions, self.open_start, self.cursor = self.rope.run(self.cursor, [length for _, length in run])
        self.out.append(positions)
        self.last_uid = run[-1][0]

    def tokens(self, uids: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor) -> None:
        """Tokens of units kept in part: each at its offset in its unit; a unit takes its whole span
        at the next free position (a unit continued from the previous part keeps its start)."""
        if not len(uids):
            return
        prefix = lengths - self.rope.n - 1
        span = prefix + self.rope.side + 1
        starts = torch.ones_like(uids, dtype=torch.bool)
        starts[1:] = uids[1:] != uids[:-1]
        starts[0] = self.last_uid is None or int(uids[0]) != self.last_uid
        reached = (span * starts).cumsum(0)  # [T] spans of the units begun up to each token
        unit_start = self.cursor + reached - span
        unit_start = torch.where(reached == 0, self.open_start, unit_start)  # the continued unit
        self.out.append(self.rope.relative(offsets, prefix) + unit_start)
        self.cursor += int(reached[-1])
        self.open_start, self.last_uid = int(unit_start[-1]), int(uids[-1])

    def take(self) -> torch.Tensor:
        out = torch.cat(self.out, dim=1) if self.out else torch.empty(3, 0, dtype=torch.long)
        self.out = []
        return out
