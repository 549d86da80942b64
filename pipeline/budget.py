"""Layer-adaptive budgets (StreamKV): split a total count of blocks among layers by score mass.

Layers whose scores are concentrated on few blocks get fewer, layers with flat scores get more;
each layer stays within base * (1 -+ temp), and the counts always add up to the total.
"""

from __future__ import annotations

import math

import torch


def uniform_budgets(sizes: list[int], per_layer: int) -> list[int]:
    return [min(n, per_layer) for n in sizes]


def adaptive_budgets(scores: list[torch.Tensor], total: int, base: float, temp: float) -> list[int]:
    """Per-layer counts for `scores` (one 1-D tensor of block scores per layer).

    1. z-score each layer's scores (all-equal scores, e.g. a one-block segment, give a uniform
       distribution instead of the published code's NaN), softmax, sort descending, cumulate.
    2. Binary-search one mass threshold p shared by all layers so that the counts (entries whose
       cumulative mass stays below p, at least 1) add up to `total`.
    3. Clamp each count to [base * (1 - temp), base * (1 + temp)] (and to the layer's size),
       rescale to the total, round, and repair the remainder by +-1 steps.
    The result sums to `total` clipped into the range the clamps allow.
    """
    sizes = [int(s.numel()) for s in scores]
    low = [min(n, max(1, math.floor(base * (1 - temp)))) for n in sizes]
    high = [min(n, max(1, math.ceil(base * (1 + temp)))) for n in sizes]
    total = min(max(total, sum(low)), sum(high))
    masses = [_sorted_mass(s) for s in scores]  # per layer, probabilities sorted descending
    cumulative = [m.cumsum(0) for m in masses]

    def counts_at(p: float) -> list[int]:
        return [min(n, max(1, int((c < p).sum()))) for n, c in zip(sizes, cumulative)]

    lo_p, hi_p = 0.0, 1.0 + 1e-6
    for _ in range(40):
        mid = (lo_p + hi_p) / 2
        if sum(counts_at(mid)) <= total:
            lo_p = mid
        else:
            hi_p = mid
    counts = [min(max(c, lo), hi) for c, lo, hi in zip(counts_at(lo_p), low, high)]
    scale = total / max(sum(counts), 1)
    counts = [min(max(round(c * scale), lo), hi) for c, lo, hi in zip(counts, low, high)]
    return _repair(counts, total, low, high, masses)


def _sorted_mass(scores: torch.Tensor) -> torch.Tensor:
    scores = scores.float()
    if scores.numel() == 0:
        return scores
    std = scores.std(unbiased=False) if scores.numel() > 1 else scores.new_zeros(())
    z = (scores - scores.mean()) / std if std > 0 else torch.zeros_like(scores)
    return torch.softmax(z, dim=0).sort(descending=True).values


def _repair(counts: list[int], total: int, low: list[int], high: list[int], masses: list[torch.Tensor]) -> list[int]:
    """+-1 steps until the counts add up: add where the next block carries the most mass, remove
    where the last kept block carries the least."""
    while sum(counts) < total:
        room = [i for i, c in enumerate(counts) if c < high[i]]
        best = max(room, key=lambda i: float(masses[i][counts[i]]))
        counts[best] += 1
    while sum(counts) > total:
        room = [i for i, c in enumerate(counts) if c > low[i]]
        worst = min(room, key=lambda i: float(masses[i][counts[i] - 1]))
        counts[worst] -= 1
    return counts
