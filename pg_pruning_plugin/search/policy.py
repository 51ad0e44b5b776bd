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
    "ESTIMATORS",
    "INIT_MAPPINGS",
    "MASK_RULES",
    "antithetic_gradient",
    "estimate_gradient",
    "policy_gradient",
    "sample_masks",
    "usable_samples",
    "project_to_budget",
    "project_pools",
    "scores_from_metric",
    "top_k_mask",
]

EPS = 1e-7

# authors: EMA baseline (method.md §4-§5); loo: leave-one-out baseline over the K samples;
# antithetic: K/2 pairs drawn with uniforms u and 1-u, DisARM estimator per pair.
ESTIMATORS = ("authors", "loo", "antithetic")


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


def antithetic_gradient(
    losses: torch.Tensor,  # [K] losses; rows 2i and 2i+1 form an antithetic pair
    masks: torch.Tensor,  # [K, n] masks drawn by ``sample_masks(..., antithetic=True)``
    probs: torch.Tensor,  # [n]
) -> torch.Tensor:  # [n]
    """DisARM (Dong et al., 2020) over antithetic pairs, on the authors' scale.

    Per pair ``(a, b)`` the logit gradient is ``½ (L_a − L_b)(m_a − m_b) σ(|θ|)`` with
    ``σ(|θ|) = max(s, 1 − s)``; its mean over pairs is unbiased for ``∂E[L]/∂θ`` and needs no
    baseline. It is multiplied by ``K/(K−1) / sqrt((s+ε)(1−s+ε))``, the factor that turns
    ``∂E[L]/∂θ`` into the expectation of :func:`estimate_gradient` with a constant baseline, so
    the learning rate means the same for every estimator.
    """
    k = losses.shape[0]
    if k < 2 or k % 2:
        raise ValueError("the antithetic estimator needs an even number (>= 2) of samples")
    diff = (losses[0::2] - losses[1::2]).to(probs.dtype)  # [K/2]
    disagree = masks[0::2].to(probs.dtype) - masks[1::2].to(probs.dtype)  # [K/2, n] in {-1, 0, 1}
    logit_grad = 0.5 * (diff @ disagree) / (k // 2) * torch.maximum(probs, 1 - probs)
    return logit_grad * (k / (k - 1)) / torch.sqrt((probs + EPS) * (1 - probs + EPS))


def policy_gradient(estimator: str, losses: torch.Tensor, masks: torch.Tensor, probs: torch.Tensor,
                    baseline: float) -> torch.Tensor:
    """The gradient estimate of ``estimator`` (one of :data:`ESTIMATORS`); ``baseline`` is the EMA.

    ``loo`` is the authors' formula with sample j's baseline ``b_j = mean_{i≠j} L_i`` instead of
    the EMA: since ``L_j − b_j = K/(K−1)·(L_j − L̄)`` it is ``K/(K−1)`` times
    :func:`estimate_gradient` with the baseline ``L̄``. Every estimator has the expectation of the
    authors' one with a constant baseline, so one learning rate means the same step for all.
    """
    if estimator == "authors":
        return estimate_gradient(losses, masks, probs, baseline)
    if estimator == "loo":
        k = losses.shape[0]
        return estimate_gradient(losses, masks, probs, float(losses.mean())) * (k / (k - 1))
    if estimator == "antithetic":
        return antithetic_gradient(losses, masks, probs)
    raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")


def sample_masks(probs: torch.Tensor, num_samples: int, generator: torch.Generator,
                 antithetic: bool = False) -> torch.Tensor:
    """``[K, n]`` Bernoulli(``probs``) keep masks ``m = [u < s]``.

    With ``antithetic`` rows ``2i`` and ``2i+1`` use the uniforms ``u`` and ``1 − u`` (K even).
    """
    if not antithetic:
        return (torch.rand(num_samples, probs.numel(), generator=generator) < probs).float()
    if num_samples % 2:
        raise ValueError("antithetic sampling needs an even number of samples")
    u = torch.rand(num_samples // 2, probs.numel(), generator=generator)
    return (torch.stack([u, 1 - u], dim=1).flatten(0, 1) < probs).float()


def usable_samples(losses: torch.Tensor, estimator: str) -> torch.Tensor:
    """Bool ``[K]``: finite losses; for ``antithetic`` both members of a pair must be finite."""
    finite = torch.isfinite(losses)
    if estimator == "antithetic":
        finite = finite.view(-1, 2).all(dim=1).repeat_interleave(2)
    return finite


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


INIT_MAPPINGS = ("sigmap", "norm", "mask", "const")


def scores_from_metric(metric: torch.Tensor, keep_ratio: float, mapping: str = "sigmap",
                       confidence: float = 0.9) -> torch.Tensor:
    """Map one layer's metric (higher = more important) to keep-probabilities (method.md §7.2).

    ``sigmap``: ``clamp(σ(z) + r − mean σ(z), 0, 1)`` with z the standardised metric (mean ≈ r);
    ``norm``: min-max normalised, then shifted to mean r;
    ``mask``: the authors' ``const`` mapping of the per-layer top-r init mask: kept units get
    ``confidence``, the others ``1 − confidence``, so the initial hard mask is the init mask;
    ``const``: every unit gets r (no information).
    """
    metric = metric.double()
    if mapping == "mask":
        kept = top_k_mask(metric, keep_ratio, [0, metric.numel()], global_pool=False).bool()
        return torch.where(kept, confidence, 1.0 - confidence).float()
    if mapping == "sigmap":
        z = torch.sigmoid((metric - metric.mean()) / (metric.std(unbiased=False) + 1e-8))
    elif mapping == "norm":
        z = (metric - metric.min()) / (metric.max() - metric.min() + 1e-8)
    elif mapping == "const":
        z = torch.zeros_like(metric)
    else:
        raise ValueError(f"unknown score mapping {mapping!r}; choose one of {', '.join(INIT_MAPPINGS)}")
    return (z + (keep_ratio - z.mean())).clamp(0, 1).float()


MASK_RULES = ("topk", "expected-width")


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
    """Hard 0/1 mask keeping ``n − int(n·(1−r))`` of the most probable units.

    Per layer (``global_pool=False``) the same count rule applies in each slice. Globally, the
    per-layer counts come from ``rule``: ``"topk"`` ranks all units together (method.md §8);
    ``"expected-width"`` gives each layer its expected kept count ``Σ s`` (rounded by largest
    remainder to the exact total), so unpolarised probabilities are never compared across layers.
    Within a layer the most probable units are kept. Every layer keeps at least ``min_keep`` units;
    under ``"topk"`` they count against the budget (the least probable units elsewhere give way), so
    the total is exact unless ``min_keep`` per layer alone exceeds it. With ``round_to`` each count is rounded to the nearest multiple (≥ ``round_to``, ≤ the width).
    """
    if rule not in MASK_RULES:
        raise ValueError(f"unknown mask rule {rule!r}; choose one of {', '.join(MASK_RULES)}")
    n = s.numel()
    total = n - int(n * (1 - keep_ratio) + 1e-9)
    bounds = list(zip(offsets[:-1], offsets[1:]))
    if not global_pool:
        counts = [(b - a) - int((b - a) * (1 - keep_ratio) + 1e-9) for a, b in bounds]
    elif rule == "topk":
        counts = _topk_counts(s, total, bounds, min_keep)
    else:
        sums = torch.stack([s[a:b].double().sum() for a, b in bounds])
        counts = _largest_remainder(sums * total / sums.sum(), total)
    mask = torch.zeros(n)
    for (a, b), count in zip(bounds, counts):
        width = b - a
        count = min(width, max(count, min_keep))
        if round_to:
            count = min(width, max(round_to, int(math.floor(count / round_to + 0.5)) * round_to))
        mask[a + torch.topk(s[a:b], count).indices] = 1.0
    return mask
