"""The policy: Bernoulli keep-probabilities, mask sampling, the EMA baseline and the gradient estimators
(method.md §3–§5).

Everything here is plain tensor math on flat per-type vectors; the model never appears.

A new estimator is one function ``(losses [K], masks [K, n], probs [n], baseline) -> [n]`` registered
in :data:`ESTIMATORS`; ``SearchConfig(estimator=name)`` and ``pg-prune prune --estimator`` accept it
from then on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..core.architectures import SearchSpace
from ..core.units import UNIT_TYPES, UnitMasks, UnitValues

__all__ = [
    "EPS",
    "ESTIMATORS",
    "Estimator",
    "antithetic_gradient",
    "ema_baseline",
    "estimate_gradient",
    "leave_one_out_gradient",
    "policy_gradient",
    "sample_masks",
    "sample_unit_masks",
    "usable_samples",
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


def leave_one_out_gradient(losses: torch.Tensor, masks: torch.Tensor, probs: torch.Tensor,
                           baseline: float) -> torch.Tensor:
    """The authors' formula with sample j's baseline ``b_j = mean_{i≠j} L_i`` instead of the EMA (which
    is ignored): since ``L_j − b_j = K/(K−1)·(L_j − L̄)`` it is ``K/(K−1)`` times
    :func:`estimate_gradient` with the baseline ``L̄``."""
    k = losses.shape[0]
    return estimate_gradient(losses, masks, probs, float(losses.mean())) * (k / (k - 1))


def antithetic_gradient(
    losses: torch.Tensor,  # [K] losses; rows 2i and 2i+1 form an antithetic pair
    masks: torch.Tensor,  # [K, n] masks drawn by ``sample_masks(..., antithetic=True)``
    probs: torch.Tensor,  # [n]
    baseline: float = 0.0,  # not used: the pairs need no baseline
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


@dataclass(frozen=True)
class Estimator:
    """A gradient estimator and how its masks are drawn.

    ``antithetic``: samples come in pairs drawn with the uniforms ``u`` and ``1 − u``; a pair is
    usable only when both of its losses are finite, and K must be even.
    """

    gradient: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
    antithetic: bool = False


# authors: EMA baseline (method.md §4-§5); loo: leave-one-out baseline over the K samples;
# antithetic: K/2 pairs drawn with uniforms u and 1-u, DisARM estimator per pair. Every estimator has
# the expectation of the authors' one with a constant baseline, so one learning rate means the same step.
ESTIMATORS: dict[str, Estimator] = {
    "authors": Estimator(estimate_gradient),
    "loo": Estimator(leave_one_out_gradient),
    "antithetic": Estimator(antithetic_gradient, antithetic=True),
}


def _estimator(name: str) -> Estimator:
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name]


def policy_gradient(estimator: str, losses: torch.Tensor, masks: torch.Tensor, probs: torch.Tensor,
                    baseline: float) -> torch.Tensor:
    """The gradient estimate of ``estimator`` (a key of :data:`ESTIMATORS`); ``baseline`` is the EMA."""
    return _estimator(estimator).gradient(losses, masks, probs, baseline)


def ema_baseline(previous: float | None, mean_loss: float, window: int) -> float:
    """The EMA baseline after a step whose mean sample loss is ``mean_loss`` (it includes the current
    batch); the first step starts it at ``mean_loss``; ``window=0`` disables it (0, plain REINFORCE)."""
    if window == 0:
        return 0.0
    if previous is None:
        return mean_loss
    return (1 - 1 / window) * previous + mean_loss / window


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


def sample_unit_masks(probs: UnitValues, searched: Iterable[str], num_samples: int, generator: torch.Generator,
                      estimator: str = "authors") -> UnitMasks:
    """``num_samples`` masks of every unit type of ``probs``: Bernoulli draws for the ``searched``
    types (in :data:`~pg_pruning_plugin.core.units.UNIT_TYPES` order), all ones for the others."""
    searched, antithetic = set(searched), _estimator(estimator).antithetic
    values = probs.as_dict()
    return UnitMasks(**{
        k: sample_masks(values[k], num_samples, generator, antithetic) if k in searched
        else torch.ones(num_samples, values[k].numel())
        for k in UNIT_TYPES if k in values
    })


def threshold_band(probs: UnitValues, hard: UnitValues, space: SearchSpace, fraction: float) -> UnitValues:
    """1 for the width units within ``fraction`` of a layer's units of its hard-mask threshold (ranked by
    ``probs``), 0 elsewhere: the units a band-restricted step samples; the others keep their hard-mask
    value, so every sample is within a band of a mask the budget allows."""
    out = {}
    for kind, offsets in (("attn", space.attn_offsets), ("mlp", space.mlp_offsets)):
        values, kept = getattr(probs, kind), getattr(hard, kind)
        inside = torch.zeros_like(values)
        for a, b in zip(offsets[:-1], offsets[1:]):
            order = torch.argsort(values[a:b], descending=True, stable=True)
            threshold, width = int(kept[a:b].sum()), max(1, round(fraction * (b - a)))
            inside[a + order[max(0, threshold - width):threshold + width]] = 1.0
        out[kind] = inside
    return UnitValues(**out)


def usable_samples(losses: torch.Tensor, estimator: str) -> torch.Tensor:
    """Bool ``[K]``: finite losses; for an antithetic estimator both members of a pair must be finite."""
    finite = torch.isfinite(losses)
    if _estimator(estimator).antithetic:
        finite = finite.view(-1, 2).all(dim=1).repeat_interleave(2)
    return finite
