"""The policy: Bernoulli keep-probabilities, the authors' gradient estimator, budget projection,
score initialisation from a metric, and the final hard mask (method.md §3–§8).

Everything here is plain tensor math on flat per-type vectors; the model never appears.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "EPS",
    "estimate_gradient",
    "project_to_budget",
    "project_pools",
    "scores_from_metric",
    "top_k_mask",
]

EPS = 1e-7


def estimate_gradient(
    losses: torch.Tensor,  # [K] losses of the valid samples
    masks: torch.Tensor,  # [K, n] sampled keep masks (0/1)
    probs: torch.Tensor,  # [n] keep-probabilities s
    baseline: float,
) -> torch.Tensor:  # [n]
    """``g = 1/(K-1) · Σ_j (L_j − b)(m_j − s) / sqrt((s+ε)(1−s+ε))`` exactly as the authors' code."""
    k = losses.shape[0]
    if k < 2:
        raise ValueError("the estimator needs at least 2 valid samples per step")
    advantage = (losses - baseline).to(probs.dtype)  # [K]
    score = (masks.to(probs.dtype) - probs) / torch.sqrt((probs + EPS) * (1 - probs + EPS))  # [K, n]
    return advantage @ score / (k - 1)


def project_to_budget(s: torch.Tensor, budget: float, tol: float = 1e-3, max_iter: int = 20) -> torch.Tensor:
    """Shift ``s`` down by ``v ≥ 0`` so that ``Σ clamp(s − v, 0, 1) ≈ budget``; never shifts up.

    Bisection on ``v ∈ [0, max(s)]`` stopping at ``|f(v)| < tol`` or after ``max_iter`` halvings,
    then clamp to [0, 1] (method.md §6).
    """
    if s.clamp(0, 1).sum() <= budget:
        return s.clamp(0, 1)
    lo, hi = 0.0, float(s.max())
    v = hi
    for _ in range(max_iter):
        v = (lo + hi) / 2
        excess = float((s - v).clamp(0, 1).sum()) - budget
        if abs(excess) < tol:
            break
        if excess > 0:
            lo = v
        else:
            hi = v
    return (s - v).clamp(0, 1)


def project_pools(s: torch.Tensor, keep_ratio: float, offsets: Sequence[int] | None) -> torch.Tensor:
    """Project one pool (global, ``offsets=None``) or each ``offsets[l]:offsets[l+1]`` slice (per layer)."""
    if offsets is None:
        return project_to_budget(s, keep_ratio * s.numel())
    out = s.clone()
    for a, b in zip(offsets[:-1], offsets[1:]):
        out[a:b] = project_to_budget(s[a:b], keep_ratio * (b - a))
    return out


def scores_from_metric(metric: torch.Tensor, keep_ratio: float, mapping: str = "sigmap") -> torch.Tensor:
    """Map one layer's metric (higher = more important) to keep-probabilities with mean ≈ ``keep_ratio``.

    ``sigmap``: ``clamp(σ(z) + r − mean σ(z), 0, 1)`` with z the standardised metric (method.md §7.2);
    ``norm``: min-max normalised, then shifted to mean r;
    ``const``: every unit gets r.
    """
    metric = metric.double()
    if mapping == "sigmap":
        z = torch.sigmoid((metric - metric.mean()) / (metric.std(unbiased=False) + 1e-8))
    elif mapping == "norm":
        z = (metric - metric.min()) / (metric.max() - metric.min() + 1e-8)
    elif mapping == "const":
        z = torch.zeros_like(metric)
    else:
        raise ValueError(f"unknown score mapping {mapping!r}; choose sigmap, norm or const")
    return (z + (keep_ratio - z.mean())).clamp(0, 1).float()


def top_k_mask(
    s: torch.Tensor,
    keep_ratio: float,
    offsets: Sequence[int],
    global_pool: bool,
    min_keep: int = 1,
    round_to: int | None = None,
) -> torch.Tensor:
    """Hard 0/1 mask keeping the most probable units (method.md §8).

    Global: ``n − int(n·(1−r))`` units over all layers; per layer: the same rule in each slice.
    Every layer keeps at least ``min_keep`` units. With ``round_to``, each layer's kept count is
    rounded to the nearest multiple (at least ``round_to``, at most the layer width).
    """
    n = s.numel()
    keep = torch.zeros(n, dtype=torch.bool)
    if global_pool:
        keep[torch.topk(s, n - int(n * (1 - keep_ratio) + 1e-9)).indices] = True
    counts = []
    for a, b in zip(offsets[:-1], offsets[1:]):
        width = b - a
        count = int(keep[a:b].sum()) if global_pool else width - int(width * (1 - keep_ratio) + 1e-9)
        count = max(count, min(min_keep, width))
        if round_to:
            count = min(width, max(round_to, int(math.floor(count / round_to + 0.5)) * round_to))
        counts.append(count)
    mask = torch.zeros(n)
    for (a, b), count in zip(zip(offsets[:-1], offsets[1:]), counts):
        mask[a + torch.topk(s[a:b], count).indices] = 1.0
    return mask
