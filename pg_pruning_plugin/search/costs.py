"""Costs of units in parameters or FLOPs, and the cost-weighted projection and final mask of one budget.

Every width unit has a cost ``c`` (its weights by default, or forward FLOPs per token at a context
length); a whole attention or MLP block costs what its kept width units cost. With block
keep-probabilities ``b`` (1 when blocks are not searched) the expected kept cost is

    E[C] = Σ_l  b_attn,l · Σ_{g∈l} c_g s_g  +  b_mlp,l · Σ_{j∈l} c_j s_j

and :func:`project_to_cost` keeps ``E[C]`` at the budget after every step: every searched
probability moves down by the same ``v ≥ 0``, found by bisection on the cost-weighted sum (the
paper's projection with a weighted constraint). :func:`cost_mask` then drops units in order of increasing
keep-probability until the kept cost is within the budget. :func:`budget_accounting` states what a final
mask keeps, in parameters and FLOPs, per layer and by unit kind. The budget object that uses these is
:class:`~pg_pruning_plugin.search.budget.CostBudget`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..core.architectures import SearchSpace
from ..core.selection import nearest_multiple
from ..core.units import BLOCK_TYPES, WIDTH_TYPES, UnitValues

__all__ = [
    "COSTS",
    "budget_accounting",
    "check_custom_costs",
    "cost_mask",
    "expected_cost",
    "minimum_cost",
    "project_to_cost",
    "unit_costs",
]

COSTS = ("params", "flops", "custom")


def unit_costs(space: SearchSpace, cost: str = "params", seq_len: int = 2048,
               custom: dict[str, float] | None = None) -> UnitValues:
    """Cost of every KV group and MLP channel (float64). ``custom``: ``{"attn": c, "mlp": c}`` per unit."""
    if cost == "params":
        attn = [float(space.params_per_attn_unit(i)) for i in range(space.num_layers)]
        mlp = float(space.params_per_mlp_unit())
    elif cost == "flops":
        attn = [float(space.flops_per_attn_unit(i, seq_len)) for i in range(space.num_layers)]
        mlp = float(space.flops_per_mlp_unit())
    elif cost == "custom":
        check_custom_costs(custom)
        attn, mlp = [float(custom["attn"])] * space.num_layers, float(custom["mlp"])
    else:
        raise ValueError(f"cost={cost!r}; choose one of {', '.join(COSTS)}")
    return UnitValues(
        torch.cat([torch.full((s.num_kv_groups,), attn[i], dtype=torch.float64) for i, s in enumerate(space.layers)]),
        torch.full((space.num_mlp_units,), mlp, dtype=torch.float64),
    )


def check_custom_costs(custom: dict[str, float] | None) -> None:
    """Custom costs need a positive cost per KV group (``attn``) and per MLP channel (``mlp``)."""
    if not custom or set(custom) != {"attn", "mlp"}:
        raise ValueError("custom costs need exactly the keys 'attn' (per KV group) and 'mlp' (per MLP channel)")
    for key, value in custom.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"the cost of a {key} unit is {value!r}; every unit type needs a positive cost")


def _layer_ids(offsets: list[int]) -> torch.Tensor:
    """Layer index of every unit (cached: the projection's bisection asks for it at every halving)."""
    return _cached_layer_ids(tuple(offsets))


@functools.lru_cache(maxsize=8)
def _cached_layer_ids(offsets: tuple[int, ...]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(offsets) - 1), torch.tensor(offsets).diff())


def _block_sums(values: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """``[L]`` sums of ``values`` over each layer's slice."""
    return torch.zeros(len(offsets) - 1, dtype=values.dtype).index_add(0, _layer_ids(offsets), values)


def _width_costs(probs: UnitValues, costs: UnitValues, space: SearchSpace) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected kept cost of each layer's attention and MLP widths, ``[L]`` each (blocks ignored)."""
    return (_block_sums(costs.attn * probs.attn.double(), space.attn_offsets),
            _block_sums(costs.mlp * probs.mlp.double(), space.mlp_offsets))


def expected_cost(probs: UnitValues, costs: UnitValues, space: SearchSpace) -> float:
    """``E[C]`` under independent Bernoulli units (a hard 0/1 mask gives its exact kept cost)."""
    attn, mlp = _width_costs(probs, costs, space)
    if probs.has_blocks:
        attn, mlp = attn * probs.attn_blocks.double(), mlp * probs.mlp_blocks.double()
    return float(attn.sum() + mlp.sum())


def project_to_cost(probs: UnitValues, costs: UnitValues, space: SearchSpace, budget: float,
                    searched: Iterable[str], iterations: int = 60) -> UnitValues:
    """Shift the ``searched`` probabilities down by one ``v ≥ 0`` (then clamp to [0, 1]) so that
    ``E[C] = budget`` up to bisection precision; never shifts up, unsearched fields stay as they are.

    For width units this is the paper's projection with the constraint weighted by cost: the
    Euclidean projection onto ``Σ c_i s_i = B`` in the metric ``Σ c_i Δs_i²``, where moving an
    expensive unit's probability costs in proportion. (The plain Euclidean projection would move each
    unit by ``v·c_i``; a SmolLM2 KV group costs as much as 171 channels, so KV groups would absorb
    almost every correction.)
    """
    searched = tuple(searched)
    clamped = UnitValues(**{k: v.clamp(0, 1) for k, v in probs.as_dict().items()})
    if expected_cost(clamped, costs, space) <= budget:
        return clamped
    start = {k: v.double() for k, v in clamped.as_dict().items()}

    def shifted(v: float) -> UnitValues:
        return UnitValues(**{k: (s - v).clamp(0, 1) if k in searched else s for k, s in start.items()})

    lo, hi = 0.0, max(float(start[k].max()) for k in searched)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if expected_cost(shifted(mid), costs, space) > budget:
            lo = mid
        else:
            hi = mid
    return UnitValues(**{k: v.float() for k, v in shifted(hi).as_dict().items()})


def minimum_cost(costs: UnitValues, space: SearchSpace, granularity: str, min_channels: int = 1) -> float:
    """The smallest cost a final mask can keep: one KV group and ``min_channels`` channels per layer
    (width), or one block of one decoder layer (depth), or the cheapest kept unit of one block (both)."""
    attn_min = [float(costs.attn[space.attn_slice(i)].min()) for i in range(space.num_layers)]
    mlp_min = [float(costs.mlp[space.mlp_slice(i)].min()) * min_channels for i in range(space.num_layers)]
    if granularity == "width":
        return sum(attn_min) + sum(mlp_min)
    if granularity == "depth":
        attn_blocks, mlp_blocks = _block_sums(costs.attn, space.attn_offsets), _block_sums(costs.mlp, space.mlp_offsets)
        return float(torch.minimum(attn_blocks, mlp_blocks).min())
    return min(min(attn_min), min(mlp_min))


def cost_mask(probs: UnitValues, costs: UnitValues, space: SearchSpace, budget: float, searched: Iterable[str],
              min_channels: int = 1, round_to: int | None = None) -> UnitValues:
    """Hard 0/1 masks whose kept cost is at most ``budget``.

    Units of the ``searched`` types are dropped in order of increasing keep-probability until the
    kept cost fits. A unit is skipped when dropping it would leave a kept block without a KV group (or
    with fewer than ``min_channels`` channels), or leave no decoder layer at all; dropping a block
    frees what its kept units cost. Dropped units that still fit are then put back, most probable
    first, so a large last block does not waste the budget. ``round_to`` rounds each kept MLP width to the
    nearest multiple afterwards (:func:`~pg_pruning_plugin.core.selection.nearest_multiple`; the achieved cost
    can then differ from the budget by less than half a multiple per layer).
    """
    searched = tuple(searched)
    num_layers = space.num_layers
    keep = {"attn": torch.ones(space.num_attn_units), "mlp": torch.ones(space.num_mlp_units),
            "attn_blocks": torch.ones(num_layers), "mlp_blocks": torch.ones(num_layers)}
    layer_of = {"attn": _layer_ids(space.attn_offsets).tolist(), "mlp": _layer_ids(space.mlp_offsets).tolist()}
    unit_cost = {"attn": costs.attn.tolist(), "mlp": costs.mlp.tolist()}
    width_cost = {"attn": _block_sums(costs.attn, space.attn_offsets).tolist(),
                  "mlp": _block_sums(costs.mlp, space.mlp_offsets).tolist()}  # kept width cost per layer
    count = {"attn": [s.num_kv_groups for s in space.layers], "mlp": [s.intermediate_size for s in space.layers]}
    floor = {"attn": 1, "mlp": min_channels}
    block_kept = {"attn": [True] * num_layers, "mlp": [True] * num_layers}
    layers_kept = num_layers
    total = sum(width_cost["attn"]) + sum(width_cost["mlp"])

    candidates = []  # (probability, type, index)
    for kind in searched:
        candidates += [(p, kind, i) for i, p in enumerate(getattr(probs, kind).tolist())]
    candidates.sort(key=lambda c: c[0])
    dropped = []
    for _, kind, i in candidates:
        if total <= budget:
            break
        if kind in WIDTH_TYPES:
            layer = layer_of[kind][i]
            if not block_kept[kind][layer] or count[kind][layer] <= floor[kind]:
                continue
            keep[kind][i] = 0.0
            count[kind][layer] -= 1
            width_cost[kind][layer] -= unit_cost[kind][i]
            total -= unit_cost[kind][i]
        else:
            width = kind.removesuffix("_blocks")
            other = "mlp" if width == "attn" else "attn"
            closes_layer = not block_kept[other][i]
            if closes_layer and layers_kept == 1:
                continue
            keep[kind][i] = 0.0
            block_kept[width][i] = False
            total -= width_cost[width][i]
            layers_kept -= closes_layer
        dropped.append((kind, i))
    # The last drops can overshoot (a block is large): put back the most probable dropped units that fit.
    for kind, i in reversed(dropped):
        if kind in WIDTH_TYPES:
            layer = layer_of[kind][i]
            if block_kept[kind][layer] and total + unit_cost[kind][i] <= budget:
                keep[kind][i] = 1.0
                count[kind][layer] += 1
                width_cost[kind][layer] += unit_cost[kind][i]
                total += unit_cost[kind][i]
        else:
            width = kind.removesuffix("_blocks")
            if total + width_cost[width][i] <= budget:
                keep[kind][i] = 1.0
                block_kept[width][i] = True
                total += width_cost[width][i]
    if round_to:
        for layer in range(num_layers):
            sl = space.mlp_slice(layer)
            kept = int(keep["mlp"][sl].sum())
            target = nearest_multiple(kept, round_to, space.layers[layer].intermediate_size)
            if block_kept["mlp"][layer] and target != kept:
                order = torch.argsort(probs.mlp[sl], descending=True)
                keep["mlp"][sl] = 0.0
                keep["mlp"][sl.start + order[:target]] = 1.0
    blocks = any(k in BLOCK_TYPES for k in searched)
    return UnitValues(keep["attn"], keep["mlp"], keep["attn_blocks"] if blocks else None,
                      keep["mlp_blocks"] if blocks else None)


@dataclass
class _Totals:
    params: float
    flops: float


def budget_accounting(space: SearchSpace, masks: UnitValues, seq_len: int = 2048,
                      requested_params: float | None = None, requested_flops: float | None = None) -> dict:
    """Requested vs achieved prunable parameters and FLOPs per token, per layer and by unit kind.

    ``space`` is the unpruned model's; ``masks`` the final 0/1 masks. Removed cost is attributed to
    ``blocks`` (everything a removed block had), ``kv_groups`` and ``channels`` (units removed inside
    kept blocks).
    """
    params, flops = unit_costs(space, "params"), unit_costs(space, "flops", seq_len)
    blocks_a = masks.attn_blocks if masks.has_blocks else torch.ones(space.num_layers)
    blocks_m = masks.mlp_blocks if masks.has_blocks else torch.ones(space.num_layers)
    layers, removed = [], {"blocks": _Totals(0, 0), "kv_groups": _Totals(0, 0), "channels": _Totals(0, 0)}
    for i, shape in enumerate(space.layers):
        a, m = masks.attn[space.attn_slice(i)], masks.mlp[space.mlp_slice(i)]
        row = {"layer": i, "attn_block": bool(blocks_a[i]), "mlp_block": bool(blocks_m[i]),
               "kv_groups": int(a.sum()) if blocks_a[i] else 0, "kv_groups_dense": shape.num_kv_groups,
               "channels": int(m.sum()) if blocks_m[i] else 0, "channels_dense": shape.intermediate_size}
        for unit_cost, field in ((params, "params"), (flops, "flops")):
            ca, cm = unit_cost.attn[space.attn_slice(i)], unit_cost.mlp[space.mlp_slice(i)]
            kept = float(blocks_a[i]) * float(ca @ a.double()) + float(blocks_m[i]) * float(cm @ m.double())
            row[field], row[f"{field}_dense"] = kept, float(ca.sum() + cm.sum())
            for block_kept, c, mask, kind in ((blocks_a[i], ca, a, "kv_groups"), (blocks_m[i], cm, m, "channels")):
                gone = float(c.sum()) if not block_kept else float(c @ (1 - mask.double()))
                key = "blocks" if not block_kept else kind
                setattr(removed[key], field, getattr(removed[key], field) + gone)
        layers.append(row)
    dense = _Totals(sum(r["params_dense"] for r in layers), sum(r["flops_dense"] for r in layers))
    kept = _Totals(sum(r["params"] for r in layers), sum(r["flops"] for r in layers))
    return {
        "seq_len_for_flops": seq_len,
        "prunable_params": {"dense": dense.params, "kept": kept.params, "requested": requested_params},
        "flops_per_token": {"dense": dense.flops, "kept": kept.flops, "requested": requested_flops},
        "removed_by": {k: {"params": v.params, "flops": v.flops} for k, v in removed.items()},
        "layers": layers,
    }
