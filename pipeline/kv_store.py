"""Where a stream's KV lives. All keys are stored pre-RoPE, so they can be placed at any position.

- sinks: the system prompt's KV, per layer, kept forever.
- LayerBlocks: one layer's retrievable blocks (a frame, or a segment summary), with their mean keys.
  Layers may keep different blocks (guidance compression).
- Window: raw KV of the most recent units, all layers: what new frames attend to while encoding
  (ReKV's local window; LiveVLM's short-term memory). It holds references, not copies.
- TokenPool: LiveVLM's long-term memory of one layer, token by token, compressed by VSB.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

KV = tuple[torch.Tensor, torch.Tensor]  # keys, values [Hkv, n, d]


class Visual(tuple):
    """(keys, values) of visual tokens, tagged with the unit each token comes from and its index
    there, so a placement can give them their unit's positions (M-RoPE). A plain KV is text.

    uid: one unit for all tokens (index 0..n-1), or per-token uids [n] with `token_index` [n]
    (each token's offset in its unit) and `lengths` [n] (its unit's stored tokens, where units
    differ in length: Qwen3-VL's timestamps); any may be a callable giving the tensor, computed
    only by a placement that needs it (1-D RoPE never does).
    """

    def __new__(cls, keys: torch.Tensor, values: torch.Tensor, uid: int | torch.Tensor, token_index=None,
                lengths=None):
        part = super().__new__(cls, (keys, values))
        part.uid, part.token_index, part.lengths = uid, token_index, lengths
        return part

    def units(self) -> torch.Tensor:
        n = self[0].shape[1]
        if isinstance(self.uid, int):
            return torch.full((n,), self.uid, dtype=torch.long)
        return self.uid() if callable(self.uid) else self.uid

    def index(self) -> torch.Tensor:
        if self.token_index is None:
            return torch.arange(self[0].shape[1])
        return self.token_index() if callable(self.token_index) else self.token_index

    def unit_lengths(self) -> torch.Tensor:
        """Stored tokens of each token's unit [n] (a whole unit: its own length)."""
        if self.lengths is None:
            return torch.full((self[0].shape[1],), self[0].shape[1], dtype=torch.long)
        return self.lengths() if callable(self.lengths) else self.lengths


@dataclass(frozen=True)
class UnitInfo:
    """What one block of KV covers in the stream."""

    uid: int
    kind: str  # "frame" | "summary"
    frames: tuple[int, int]  # [first, last + 1)
    times: tuple[float, float]
    segment: int
    first_position: int  # original position of its first token in the stream
    tokens: int = 0  # stored tokens (0: the model's tokens_per_unit; Qwen3-VL's vary with the timestamp)


def mean_key(keys: torch.Tensor) -> torch.Tensor:
    """A block representative: the mean pre-RoPE key over tokens, [Hkv, d] in fp32.

    Kept per KV head; scoring sums the query heads of each group first, which equals the dot
    product with KV heads expanded to query heads and concatenated (docs/METHODS.md), at 1/group size.
    """
    return keys.float().mean(dim=1)


class PageSlice:
    """One unit's (keys, values) in one layer: tokens [start, stop) of a page's [Hkv, T, d]
    tensors, made into views only when read (it unpacks and indexes as a KV pair). A replica that
    maps pages from the object store holds thousands of blocks, and two view tensors each would
    cost ~1.5 KiB of bookkeeping, as much as a demo-model block's KV (cache_store/wire.py)."""

    __slots__ = ("keys_page", "values_page", "start", "stop")

    def __init__(self, keys_page: torch.Tensor, values_page: torch.Tensor, start: int, stop: int):
        self.keys_page, self.values_page, self.start, self.stop = keys_page, values_page, start, stop

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> torch.Tensor:
        return (self.keys_page, self.values_page)[i][:, self.start : self.stop]

    def __iter__(self):
        return iter((self[0], self[1]))

    def regions(self) -> list[tuple[int, int]]:
        """(address, bytes) of the keys' and values' slices, without making the views (accounting
        over every block would otherwise make thousands of them, and the allocator keeps the space)."""
        return [(page.data_ptr() + self.start * page.stride(1) * page.element_size(),
                 page.shape[0] * (self.stop - self.start) * page.shape[2] * page.element_size())
                for page in (self.keys_page, self.values_page)]


class LayerBlocks:
    """Blocks one layer can retrieve, in time order."""

    def __init__(self):
        self.kv: list[KV | PageSlice] = []  # each (keys, values) [Hkv, n, d]
        self.uids: list[int] = []
        self._reps: torch.Tensor | None = None  # [capacity, Hkv, d]

    def __len__(self) -> int:
        return len(self.uids)

    @property
    def keys(self) -> list[torch.Tensor]:
        return [kv[0] for kv in self.kv]

    @property
    def values(self) -> list[torch.Tensor]:
        return [kv[1] for kv in self.kv]

    @property
    def reps(self) -> torch.Tensor:
        """Representatives [U, Hkv, d] (fp32)."""
        return self._reps[: len(self.uids)]

    def add(self, uid: int, kv: KV | PageSlice) -> None:
        rep = mean_key(kv[0])
        if self._reps is None or len(self.uids) == self._reps.shape[0]:
            grown = rep.new_empty(max(16, 2 * len(self.uids)), *rep.shape)
            if self._reps is not None:
                grown[: len(self.uids)] = self._reps
            self._reps = grown
        self._reps[len(self.uids)] = rep
        self.kv.append(kv)
        self.uids.append(uid)

    def drop_oldest(self, count: int) -> None:
        if count <= 0:
            return
        del self.kv[:count], self.uids[:count]
        self._reps = self._reps[count:].clone()

    def gather(self, indices: list[int]) -> list[KV]:
        """The selected blocks' KV, in the given order."""
        return [Visual(*self.kv[i], self.uids[i]) for i in indices]

    def tensors(self) -> list[torch.Tensor | PageSlice]:
        """The blocks' KV for accounting (tensor_bytes, regions): tensors, or page slices unmade."""
        return [part for kv in self.kv for part in ([kv] if isinstance(kv, PageSlice) else kv)]

    def index_tensors(self) -> list[torch.Tensor]:
        """The representatives' storage, its spare capacity included."""
        return [] if self._reps is None else [self._reps]


class Window:
    """Raw KV of the most recent units across layers, at most `limit` tokens and `units` units
    (None: unbounded).

    Whole units enter and leave (the window is unit-granular, chosen for simplicity).
    """

    def __init__(self, layers: int, limit: int | None, units: int | None = None):
        self.layers = layers
        self.limit = limit
        self.max_units = units
        self.entries: deque[tuple[int, list[KV]]] = deque()  # (uid, per-layer KV)
        self.tokens = 0

    def push(self, uid: int, per_layer: list[KV]) -> list[tuple[int, list[KV]]]:
        """Add a unit; return the units that fell out of the window, oldest first."""
        self.entries.append((uid, per_layer))
        self.tokens += per_layer[0][0].shape[1]
        evicted = []
        while len(self.entries) > 1 and ((self.limit is not None and self.tokens > self.limit)
                                         or (self.max_units is not None and len(self.entries) > self.max_units)):
            old = self.entries.popleft()
            self.tokens -= old[1][0][0].shape[1]
            evicted.append(old)
        return evicted

    def uids(self) -> list[int]:
        return [uid for uid, _ in self.entries]

    def parts(self, layer: int) -> list[KV]:
        """One layer's window KV, unit by unit, oldest first."""
        return [Visual(*kv[layer], uid) for uid, kv in self.entries]

    def tensors(self) -> list[torch.Tensor | PageSlice]:
        """As LayerBlocks.tensors."""
        return [part for _, per_layer in self.entries for kv in per_layer
                for part in ([kv] if isinstance(kv, PageSlice) else kv)]


class TokenPool:
    """One layer's long-term memory (LiveVLM): tokens in time order with their origins."""

    def __init__(self):
        self.keys: torch.Tensor | None = None  # [Hkv, N, d]
        self.values: torch.Tensor | None = None
        self.positions = torch.empty(0, dtype=torch.long)  # [N] original stream positions
        self.uids = torch.empty(0, dtype=torch.long)  # [N] unit each token came from

    def __len__(self) -> int:
        return int(self.positions.numel())

    def append(self, keys: torch.Tensor, values: torch.Tensor, first_position: int, uid: int) -> None:
        n = keys.shape[1]
        self.keys = keys if self.keys is None else torch.cat([self.keys, keys], dim=1)
        self.values = values if self.values is None else torch.cat([self.values, values], dim=1)
        self.positions = torch.cat([self.positions, torch.arange(first_position, first_position + n)])
        self.uids = torch.cat([self.uids, torch.full((n,), uid, dtype=torch.long)])

    def keep(self, indices: torch.Tensor) -> None:
        """Keep only the tokens at `indices` (sorted ascending: time order is preserved)."""
        device_indices = indices.to(self.keys.device)
        self.keys = self.keys.index_select(1, device_indices)
        self.values = self.values.index_select(1, device_indices)
        self.positions = self.positions[indices]
        self.uids = self.uids[indices]

    def pages(self, page_tokens: int) -> list[tuple[int, int]]:
        """[start, end) token ranges of consecutive pages of `page_tokens` (the last may be short)."""
        return [(s, min(s + page_tokens, len(self))) for s in range(0, len(self), page_tokens)]

    def page_reps(self, page_tokens: int) -> torch.Tensor:
        """mean_key of every page of `pages(page_tokens)`, [P, Hkv, d] fp32: one reduction for the
        full pages, not one per page (a GPU kernel launch each: thousands per question)."""
        keys = self.keys.float()  # [Hkv, N, d]
        full = len(self) // page_tokens * page_tokens
        reps = keys[:, :full].unflatten(1, (-1, page_tokens)).mean(dim=2)  # [Hkv, full pages, d]
        if full < len(self):
            reps = torch.cat([reps, keys[:, full:].mean(dim=1, keepdim=True)], dim=1)
        return reps.transpose(0, 1)

    def tensors(self) -> list[torch.Tensor]:
        return [] if self.keys is None else [self.keys, self.values]


def regions(parts) -> list[tuple[int, int]]:
    """(address, bytes) of each tensor's data, or of a page slice's keys and values."""
    out = []
    for part in parts:
        if isinstance(part, PageSlice):
            out += part.regions()
        else:
            out.append((part.data_ptr(), part.numel() * part.element_size()))
    return out


def tensor_bytes(parts, seen: set[tuple[int, int]]) -> int:
    """Bytes of the KV `parts` hold (tensors, or page slices), each region counted once across
    calls via `seen` (a block and the window entry of the same unit are one region). Regions, not
    storages: a replica's blocks are slices of pages shared through the object store
    (cache_store/wire.py), several units to a storage, and what a stream retains is the same
    however its KV is laid out."""
    total = 0
    for region in regions(parts):
        if region not in seen:
            seen.add(region)
            total += region[1]
    return total
