"""Selection rules: how many units a budget keeps, rounding of kept widths, and the top-k hard mask.

These are the only places where a fraction becomes a count:

* :func:`removed_count` is *the* count rule: removing the fraction ``r`` of ``n`` units removes
  ``int(n·r)`` of them (float error forgiven, so ``int(90·0.3) = 27``, not 26);
* :func:`nearest_multiple` is *the* rounding rule for kept widths (``round_to``): the nearest
  multiple, halves up, at least one multiple and at most a cap.

Torch-Pruning's own ``round_to`` floors instead; that rule belongs to Torch-Pruning and is named
``floor_to`` where the plugin passes it on (integrations/torch_pruning).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["MASK_RULES", "kept_count", "nearest_multiple", "removed_count", "top_k_mask"]

MASK_RULES = ("topk", "expected-width")


def removed_count(n: int, sparsity: float) -> int:
    """Units removed when the fraction ``sparsity`` of ``n`` goes: ``int(n·sparsity)``, float error forgiven."""
    return int(n * sparsity + 1e-9)


def kept_count(n: int, keep: float) -> int:
    """Units kept when the fraction ``keep`` of ``n`` stays: ``n − removed_count(n, 1 − keep)``."""
    return n - removed_count(n, 1.0 - keep)


def nearest_multiple(count: int, multiple: int, cap: int) -> int:
    """``count`` rounded to the nearest multiple of ``multiple`` (halves up), then clamped to ``[multiple, cap]``."""
    return min(cap, max(multiple, int(math.floor(count / multiple + 0.5)) * multiple))


def _largest_remainder(shares: torch.Tensor, total: int) -> list[int]:
    """Integers proportional to ``shares`` summing to ``total`` (Hamilton's method)."""
    floors = shares.floor()
    remainder = int(total - floors.sum())
    order = torch.argsort(shares - floors, descending=True)
    counts = floors.long()
    counts[order[:max(remainder, 0)]] += 1
    return counts.tolist()


def _topk_counts(s: torch.Tensor, total: int, bounds: list[tuple[int, int]], min_keep: int) -> list[int]:
    """Per-layer counts of the global top-``total`` of ``s`` given that every layer keeps its best
    ``min_keep`` units: those are reserved first, the rest of the budget goes to the highest ``s``
    among all other units, so the total stays exactly ``total`` whenever it can."""
    reserved = torch.zeros(s.numel(), dtype=torch.bool)
    for a, b in bounds:
        reserved[a + torch.topk(s[a:b], min(min_keep, b - a)).indices] = True
    rest = total - int(reserved.sum())
    if rest > 0:
        free = torch.nonzero(~reserved).flatten()
        reserved[free[torch.topk(s[free], min(rest, free.numel())).indices]] = True
    return [int(reserved[a:b].sum()) for a, b in bounds]


def top_k_mask(
    s: torch.Tensor,
    keep_ratio: float,
    offsets: Sequence[int],
    global_pool: bool,
    min_keep: int = 1,
    round_to: int | None = None,
    rule: str = "topk",
) -> torch.Tensor:
    """Hard 0/1 mask keeping :func:`kept_count` ``(n, r)`` of the most probable units.

    Per layer (``global_pool=False``) the same count rule applies in each slice. Globally, the
    per-layer counts come from ``rule``: ``"topk"`` ranks all units together (method.md §8);
    ``"expected-width"`` gives each layer its expected kept count ``Σ s`` (rounded by largest
    remainder to the exact total), so unpolarised probabilities are never compared across layers.
    Within a layer the most probable units are kept. Every layer keeps at least ``min_keep`` units;
    under ``"topk"`` they count against the budget (the least probable units elsewhere give way), so
    the total is exact unless ``min_keep`` per layer alone exceeds it. With ``round_to`` each count
    goes to :func:`nearest_multiple` (at most the layer's width).
    """
    if rule not in MASK_RULES:
        raise ValueError(f"unknown mask rule {rule!r}; choose one of {', '.join(MASK_RULES)}")
    total = kept_count(s.numel(), keep_ratio)
    bounds = list(zip(offsets[:-1], offsets[1:]))
    if not global_pool:
        counts = [kept_count(b - a, keep_ratio) for a, b in bounds]
    elif rule == "topk":
        counts = _topk_counts(s, total, bounds, min_keep)
    else:
        sums = torch.stack([s[a:b].double().sum() for a, b in bounds])
        counts = _largest_remainder(sums * total / sums.sum(), total)
    mask = torch.zeros(s.numel())
    for (a, b), count in zip(bounds, counts):
        width = b - a
        count = min(width, max(count, min_keep))
        if round_to:
            count = nearest_multiple(count, round_to, width)
        mask[a + torch.topk(s[a:b], count).indices] = 1.0
    return mask
