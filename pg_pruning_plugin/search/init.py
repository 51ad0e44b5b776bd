"""Where the search starts: initial keep-probabilities from an importance metric (method.md §7).

Width units map ``config.init`` (scoring/metrics.py) per layer through ``config.init_mapping``; both
block units of a layer map the layer's influence (1 − cosine similarity of the residual stream
across the decoder layer, ShortGPT) over all layers, so the least probable blocks come in pairs and
the start is ShortGPT's layer ranking (per-block influence was measured far worse,
docs/results/depth_budget.md). Units that are not searched stay at 1. The budget then takes the
mapped scores as its start (a cost budget projects them onto itself).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..core.architectures import SearchSpace
from ..core.selection import top_k_mask
from ..core.units import UnitValues
from ..scoring.metrics import block_influence, compute_metric
from .budget import Budget

if TYPE_CHECKING:
    from .config import SearchConfig

__all__ = ["INIT_MAPPINGS", "initial_probabilities", "scores_from_metric"]

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


def _per_layer(metric: torch.Tensor, offsets: list[int], keep: float, mapping: str, confidence: float) -> torch.Tensor:
    return torch.cat([scores_from_metric(metric[a:b], keep, mapping, confidence)
                      for a, b in zip(offsets[:-1], offsets[1:])])


def initial_probabilities(model: nn.Module, space: SearchSpace, batches: Sequence[torch.Tensor],
                          config: SearchConfig, budget: Budget, progress: bool = True) -> UnitValues:
    """The keep-probabilities a search of ``model`` starts from (module docstring); ``batches`` are
    calibration token ids ``[B, T]`` for the activation metrics."""
    mapping = "const" if config.init == "constant" else config.init_mapping
    keep = {kind: budget.initial_keep(kind) for kind in budget.searched}
    if "attn" in budget.searched:
        metric = compute_metric(model, space, config.init, batches, keep_ratio=min(keep["attn"], keep["mlp"]),
                                seed=config.seed, progress=progress)
        scores = UnitValues(
            _per_layer(metric.attn, space.attn_offsets, keep["attn"], mapping, config.init_confidence),
            _per_layer(metric.mlp, space.mlp_offsets, keep["mlp"], mapping, config.init_confidence),
        )
    else:
        scores = UnitValues.full(space, 1.0)
    if "attn_blocks" in budget.searched:
        influence = block_influence(model, space, batches, progress=progress)
        scores.attn_blocks = scores_from_metric(influence.layer, keep["attn_blocks"], mapping, config.init_confidence)
        scores.mlp_blocks = scores.attn_blocks.clone()
    return budget.start(scores)
