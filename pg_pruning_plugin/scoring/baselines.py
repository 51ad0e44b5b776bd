"""Baseline pruners in the policy-gradient search space, all at one budget: a fraction of the prunable parameters.

Every baseline returns 0/1 :class:`~pg_pruning_plugin.core.units.UnitValues` masks over the same units
as :class:`~pg_pruning_plugin.search.loop.PolicyGradientSearch`, so ``core.removal.prune_model`` removes
them. The budget ``sparsity`` is the fraction of the *prunable parameters* removed (the q/k/v/o/gate/up/down
weights, ``SearchSpace.prunable_parameters``); each method splits it between KV groups, MLP channels and
whole layers as its structure does, and :attr:`Baseline.removed_fraction` states what it achieved.
Repairing the surviving weights afterwards (FLAP's bias compensation, least squares) is not part of a
baseline: it is ``pg_pruning_plugin.refit.refit(model, masks, calibration, method="bias" | "lstsq")``,
applied to every method's masks alike.

Scores (higher means "keep"):

* ``random``: seeded standard-normal scores (``metrics.compute_metric(..., "random")``). No data.
* ``magnitude``: Torch-Pruning's group magnitude importance with ``p=2``, ``group_reduction="sum"``,
  no normalizer, i.e. the sum of squared weights over each unit's coupled q/k/v rows and o columns
  (or gate/up rows and the down column), each weight counted once. No data.
* ``taylor``: LLM-Pruner's first-order Taylor importance (``param_first``, ``sum`` grouping):
  ``Σ |w · ∂L/∂w|`` over each unit's coupled weights, with ``L`` the mean next-token cross-entropy
  over the calibration batches (one backward per batch, gradients accumulated).
* ``wanda-sp``: ``compute_metric(..., "wanda-sp")`` (``|W|·sqrt(E[x²])`` of o_proj/down_proj), measured
  layer by layer with the earlier layers pruned by the per-layer rule below (FLAP's repository's Wanda-sp).
* ``flap``: FLAP (An et al., AAAI'24). Weighted input-feature variance ``Var(x_c)·‖W[:, c]‖²`` of
  o_proj/down_proj from one dense pass (squared for attention, as the FLAP code does), standardised
  within each layer per module type, averaged over a KV group's channels. The init metric ``wifv``
  (scoring/metrics.py) is the same per-channel value grouped as Wanda-sp groups it.
* block influence (ShortGPT, Men et al. 2024): ``1 − cos(x_in, x_out)`` across a decoder layer
  (:func:`~pg_pruning_plugin.scoring.metrics.block_influence`).

Methods (:data:`BASELINES`) are a score and a structure (:data:`STRUCTURES`). With ``s`` the sparsity,
``P`` (``P_l``) the prunable parameters of the model (of layer ``l``), ``c_kv`` and ``c_ch = 3·hidden``
the parameters of one KV group and one MLP channel, each structure meets the budget as follows:

* ``global`` (``random``, ``magnitude``, ``taylor``, ``wanda-sp-global``, ``flap``: FLAP's adaptive
  structure with one ranking per unit type): the count rule's ``removed_count(n_kv, s)`` KV groups of
  lowest score over all layers, then the number of MLP channels over all layers that brings the removed
  parameters nearest to ``s·P``; every layer keeps its best KV group and channel. ``|removed − s·P| ≤
  c_ch / 2``. When all KV groups cost the same (every supported family) this removes the same fraction
  of KV groups and of channels whenever ``s·n_kv`` is an integer (SmolLM2 at 20/30/50 %: exactly ``s``
  of each, and of ``P``).
* ``per-layer`` (``wanda-sp``): in every layer ``removed_count(n_kv_l, s)`` KV groups and the number
  of channels that brings the layer's removed parameters nearest to ``s·P_l``: ``|removed_l − s·P_l| ≤
  c_ch / 2`` in every layer (SmolLM2, 3 KV groups per layer: none removed at 20 and 30 %, one at 50 %;
  the channels make up the rest).
* ``AL-AM`` (``flap-joint``, FLAP's default): one ranking of the KV groups and channels of all layers;
  units are kept best first while they fit into ``(1 − s)·P`` (one that does not fit is skipped and
  cheaper units further down fill the rest), every layer keeping its best unit of each type:
  ``s·P ≤ removed < s·P + c_ch``.
* ``layers`` (``shortgpt``): the ``round(s·L)`` decoder layers (halves up) of lowest block influence,
  whole: exact when ``s·L`` is an integer (SmolLM2's 30 layers at 20/30/50 %), else within half a layer.
* ``per-layer-units`` (``wanda-sp-units``, the authors' init mask): ``removed_count(n, s)`` KV groups
  and channels in every layer. It is *not* parameter-matched: where a layer's few KV groups round down
  it removes less (SmolLM2 at 30 %: no KV group and 460 of 1,536 channels, 22.46 % of ``P``). It is not
  in :data:`PARAM_MATCHED`.

Under a process group (core/distributed.py) the data-driven statistics are computed on calibration
shards: every rank passes the same ``batches``, runs its shard, and the sums (FLAP's statistics, block
influence, Wanda-sp's statistics, Taylor's gradients) are added over the ranks, so every rank selects
the same masks.

Depth masks for a given number of blocks (compare with ``SearchConfig(granularity="depth")``):
:func:`block_influence_masks` removes the attention and MLP blocks of lowest influence,
:func:`layer_influence_masks` whole decoder layers (ShortGPT itself).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..core import distributed
from ..core.architectures import SearchSpace, decoder_layers, projections
from ..core.modeling import eval_mode, model_device, next_token_losses
from ..core.offload import is_offloaded, onloaded
from ..core.removal import kept_space
from ..core.selection import removed_count, top_k_mask
from ..core.units import UnitValues
from .metrics import (
    BlockInfluence,
    InputStats,
    all_reduce_input_stats,
    block_influence,
    compute_metric,
    unit_weight_sums,
    weighted_input_variance,
)

__all__ = [
    "BASELINES",
    "DATA_DRIVEN",
    "PARAM_MATCHED",
    "STRUCTURES",
    "Baseline",
    "FlapStatistics",
    "baseline_masks",
    "block_influence_masks",
    "flap_scores",
    "flap_statistics",
    "layer_influence_masks",
    "per_layer_removed",
    "removed_fraction",
    "select_joint",
    "select_layers",
    "select_units",
    "taylor_scores",
]

STRUCTURES = {
    "random": "global",
    "magnitude": "global",
    "taylor": "global",
    "wanda-sp": "per-layer",
    "wanda-sp-global": "global",
    "flap": "global",
    "flap-joint": "AL-AM",
    "shortgpt": "layers",
    "wanda-sp-units": "per-layer-units",
}
BASELINES = tuple(STRUCTURES)
PARAM_MATCHED = tuple(m for m in BASELINES if STRUCTURES[m] != "per-layer-units")
DATA_DRIVEN = ("taylor", "wanda-sp", "wanda-sp-global", "flap", "flap-joint", "shortgpt", "wanda-sp-units")


@dataclass
class Baseline:
    """A baseline's selection: 0/1 ``masks``, the ranking ``scores`` behind them (for ``shortgpt`` the
    layer influence in both block fields), the fraction of the prunable parameters the masks remove, and
    whether the ratio-independent statistics came from the caller's ``cache``."""

    method: str
    masks: UnitValues
    scores: UnitValues
    structure: str
    removed_fraction: float
    reused_statistics: bool = False


def removed_fraction(space: SearchSpace, masks: UnitValues) -> float:
    """The fraction of ``space``'s prunable parameters that ``masks`` remove (removed blocks included)."""
    return 1.0 - kept_space(space, masks).prunable_parameters() / space.prunable_parameters()


# ------------------------------------------------------------------------------------------- selection

def _nearest_channels(params: float, per_channel: int) -> int:
    """The number of channels whose parameters are nearest to ``params`` (halves up, at least 0)."""
    return max(0, math.floor(params / per_channel + 0.5))


def per_layer_removed(space: SearchSpace, sparsity: float) -> list[tuple[int, int]]:
    """``(KV groups, MLP channels)`` the ``per-layer`` structure removes in every layer (module docstring)."""
    out, c_ch = [], space.params_per_mlp_unit()
    for i, shape in enumerate(space.layers):
        kv = removed_count(shape.num_kv_groups, sparsity)
        layer_params = shape.num_kv_groups * space.params_per_attn_unit(i) + shape.intermediate_size * c_ch
        channels = _nearest_channels(sparsity * layer_params - kv * space.params_per_attn_unit(i), c_ch)
        if channels >= shape.intermediate_size:
            raise ValueError(f"removing {sparsity:.0%} of layer {i}'s prunable parameters takes all of its "
                             f"{shape.intermediate_size} MLP channels; lower the sparsity")
        out.append((kv, channels))
    return out


def _top_per_layer(s: torch.Tensor, offsets: Sequence[int], removed: Sequence[int]) -> torch.Tensor:
    """0/1 mask keeping, in layer ``l``, all but the ``removed[l]`` lowest scores."""
    mask = torch.zeros(s.numel())
    for (a, b), gone in zip(zip(offsets[:-1], offsets[1:]), removed):
        mask[a + torch.topk(s[a:b], b - a - gone).indices] = 1.0
    return mask


def _top_global(s: torch.Tensor, offsets: list[int], removed: int, name: str) -> torch.Tensor:
    """0/1 mask removing the ``removed`` lowest scores over all layers, each layer keeping its best unit."""
    n, layers = offsets[-1], len(offsets) - 1
    if n - removed < layers:
        raise ValueError(f"removing {removed} of {n} {name} leaves fewer than one per layer ({layers} layers); "
                         f"lower the sparsity")
    # the count rule turns the ratio removed/n back into exactly `removed` units (float error forgiven)
    return top_k_mask(s, 1.0 - removed / n, offsets, global_pool=True)


def select_units(scores: UnitValues, space: SearchSpace, sparsity: float, structure: str) -> UnitValues:
    """0/1 masks of ``scores`` removing ``sparsity`` of the prunable parameters under ``structure``
    (``global``, ``per-layer`` or ``per-layer-units``; the rules are in the module docstring)."""
    if structure == "per-layer":
        counts = per_layer_removed(space, sparsity)
        return UnitValues(_top_per_layer(scores.attn, space.attn_offsets, [kv for kv, _ in counts]),
                          _top_per_layer(scores.mlp, space.mlp_offsets, [ch for _, ch in counts]))
    if structure == "per-layer-units":
        return UnitValues(*(top_k_mask(getattr(scores, kind), 1.0 - sparsity, offsets, global_pool=False)
                            for kind, offsets in (("attn", space.attn_offsets), ("mlp", space.mlp_offsets))))
    if structure != "global":
        raise ValueError(f"unknown structure {structure!r}; choose global, per-layer or per-layer-units")
    attn = _top_global(scores.attn, space.attn_offsets, removed_count(space.num_attn_units, sparsity), "KV groups")
    removed_attn = sum(space.params_per_attn_unit(i) * (shape.num_kv_groups - int(attn[space.attn_slice(i)].sum()))
                       for i, shape in enumerate(space.layers))
    channels = _nearest_channels(sparsity * space.prunable_parameters() - removed_attn, space.params_per_mlp_unit())
    return UnitValues(attn, _top_global(scores.mlp, space.mlp_offsets, channels, "MLP channels"))


def _reserve_best(s: torch.Tensor, offsets: Sequence[int]) -> torch.Tensor:
    """``s`` with each layer's best unit raised to +inf (it is kept first)."""
    s = s.double().clone()
    for a, b in zip(offsets[:-1], offsets[1:]):
        s[a + int(torch.argmax(s[a:b]))] = float("inf")
    return s


def select_joint(scores: UnitValues, space: SearchSpace, sparsity: float) -> UnitValues:
    """FLAP's ``AL-AM`` cut: one ranking over the KV groups and channels of all layers, kept best first
    while they fit into ``(1 − sparsity)`` of the prunable parameters (a unit that does not fit is
    skipped); every layer keeps its best unit of each type."""
    attn_cost = [space.params_per_attn_unit(i) for i, s in enumerate(space.layers) for _ in range(s.num_kv_groups)]
    costs = attn_cost + [space.params_per_mlp_unit()] * space.num_mlp_units
    budget = (1.0 - sparsity) * space.prunable_parameters()
    values = torch.cat([_reserve_best(scores.attn, space.attn_offsets), _reserve_best(scores.mlp, space.mlp_offsets)])
    reserved = int(torch.isinf(values).sum())
    keep = torch.zeros(values.numel())
    kept = 0
    for rank, i in enumerate(torch.argsort(values, descending=True, stable=True).tolist()):
        if rank < reserved or kept + costs[i] <= budget:
            keep[i] = 1.0
            kept += costs[i]
    if kept > budget:
        raise ValueError(f"removing {sparsity:.0%} of the prunable parameters leaves less than one KV group and one "
                         f"MLP channel per layer; lower the sparsity")
    return UnitValues(keep[:space.num_attn_units], keep[space.num_attn_units:])


def select_layers(influence: BlockInfluence, space: SearchSpace, sparsity: float) -> UnitValues:
    """ShortGPT at a parameter budget: the ``round(sparsity · L)`` whole layers (halves up, at most
    ``L − 1``) of lowest influence."""
    return layer_influence_masks(influence, space, min(space.num_layers - 1,
                                                       math.floor(sparsity * space.num_layers + 0.5)))


# ------------------------------------------------------------------------------------------------ FLAP

@dataclass
class FlapStatistics:
    """Per layer: FLAP's channel metric of o_proj (``[n_q·d]``) and down_proj (``[I]``) inputs."""

    attn_metric: list[torch.Tensor]
    mlp_metric: list[torch.Tensor]


@torch.no_grad()
def flap_statistics(model: nn.Module, batches: Sequence[torch.Tensor], progress: bool = True) -> FlapStatistics:
    """One dense pass over ``batches`` (``[B, T]`` ids) recording o_proj/down_proj input statistics.

    Metric (FLAP's ``WIFV``): ``Var_t(x_c)·‖W[:, c]‖²``, squared for o_proj as in the FLAP code.
    Statistics are per token over all calibration tokens (population variance).
    """
    if not batches:
        raise ValueError("FLAP needs calibration batches")
    spec = SearchSpace.from_model(model).spec
    outputs = [(getattr(getattr(layer, spec.attention), spec.o), getattr(getattr(layer, spec.mlp), spec.down))
               for layer in decoder_layers(model)]
    stats = [(InputStats(o), InputStats(d)) for o, d in outputs]
    device = model_device(model)
    try:
        with eval_mode(model):
            for ids in tqdm(distributed.shard(batches), desc="FLAP statistics", disable=not progress, leave=False):
                model(input_ids=ids.to(device), use_cache=False)
    finally:
        for pair in stats:
            for s in pair:
                s.handle.remove()
    attn_metric, mlp_metric = [], []
    for i, ((so, sd), (o, d)) in enumerate(zip(stats, outputs)):
        all_reduce_input_stats([so, sd], f"the FLAP statistics of layer {i}")
        with onloaded(o), onloaded(d):
            attn_metric.append(weighted_input_variance(so, o.weight) ** 2)
            mlp_metric.append(weighted_input_variance(sd, d.weight))
    return FlapStatistics(attn_metric=attn_metric, mlp_metric=mlp_metric)


def _standardise(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std()


def flap_scores(stats: FlapStatistics, space: SearchSpace) -> UnitValues:
    """FLAP's adaptive scores: each layer's channel metric standardised per type; a KV group's score
    is the mean over its ``n_rep·d`` standardised channels."""
    attn = [_standardise(m).view(s.num_kv_groups, -1).mean(1) for m, s in zip(stats.attn_metric, space.layers)]
    mlp = [_standardise(m) for m in stats.mlp_metric]
    return UnitValues(torch.cat(attn).float(), torch.cat(mlp).float())


# ---------------------------------------------------------------------------------------------- Taylor

def taylor_scores(model: nn.Module, batches: Sequence[torch.Tensor], progress: bool = True) -> UnitValues:
    """LLM-Pruner's first-order Taylor importance ``Σ_unit |w · ∂L/∂w|``.

    ``L`` is the mean over ``batches`` of each batch's mean next-token cross-entropy; only the
    q/k/v/o/gate/up/down weights get gradients. The model's ``requires_grad`` flags and ``.grad``
    fields are restored afterwards. Memory: activations of one batch for backprop plus one gradient
    per projection weight. Under a process group each rank back-propagates its shard of ``batches``
    and the gradients are summed over the ranks (one collective per layer). A model whose projections
    accelerate offloads is refused: its hooks replace the weights after every forward, so no gradient
    would accumulate.
    """
    if not batches:
        raise ValueError("Taylor importance needs calibration batches")
    offloaded = [p.name for p in projections(model) if is_offloaded(p.linear)]
    if offloaded:
        raise ValueError(f"Taylor importance needs the gradients of the projection weights, but accelerate offloads "
                         f"{offloaded[0]} (and {len(offloaded) - 1} more), and its hooks drop the weights after every "
                         f"forward. Dispatch the model without cpu/disk offload (a device_map over GPUs only), or use "
                         f"a forward-only baseline (wanda-sp, flap, magnitude)")
    space = SearchSpace.from_model(model)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    old_grads = [p.grad for p in params]
    device = model_device(model)
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for projection in projections(model):
            projection.linear.weight.requires_grad_(True)
        with eval_mode(model), torch.enable_grad():
            for ids in tqdm(distributed.shard(batches), desc="Taylor gradients", disable=not progress, leave=False):
                ids = ids.to(device)
                loss = next_token_losses(model(input_ids=ids, use_cache=False).logits, ids).mean()
                (loss / len(batches)).backward()
                del loss
        if distributed.is_distributed():
            for layer, group in enumerate(_projection_grads(model)):
                distributed.all_reduce_stats(group, f"the Taylor gradients of layer {layer}")
        scores = unit_weight_sums(model, space, _first_order_saliency)
    finally:
        for p, flag, grad in zip(params, flags, old_grads):
            p.grad = grad
            p.requires_grad_(flag)
    return scores.map(torch.Tensor.float)


def _projection_grads(model: nn.Module) -> list[list[torch.Tensor]]:
    """The projection weights' gradients, per decoder layer (a rank without batches has zero gradients)."""
    layers: dict[int, list[torch.Tensor]] = {}
    for projection in projections(model):
        weight = projection.linear.weight
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        layers.setdefault(projection.layer, []).append(weight.grad)
    return [layers[i] for i in sorted(layers)]


def _first_order_saliency(linear: nn.Linear) -> torch.Tensor:
    """``|w · ∂L/∂w|`` of a projection's weight (float64)."""
    return (linear.weight.detach().double() * linear.weight.grad.double()).abs()


# -------------------------------------------------------------------------------------------- front end

def _statistics_key(method: str, sparsity: float) -> str | None:
    """The ``cache`` key of what ``method`` computes before selecting (None: nothing worth keeping)."""
    if method.startswith("wanda-sp"):  # propagated through earlier layers pruned at this sparsity
        return f"{'wanda-sp-units' if method == 'wanda-sp-units' else 'wanda-sp'}@{sparsity}"
    return {"magnitude": "magnitude", "taylor": "taylor", "flap": "flap", "flap-joint": "flap",
            "shortgpt": "block-influence"}.get(method)


def _statistics(model: nn.Module, space: SearchSpace, method: str, batches: Sequence[torch.Tensor], sparsity: float,
                progress: bool):
    """Magnitudes, Taylor scores, FLAP statistics, block influence or Wanda-sp scores (see :func:`_statistics_key`).

    Wanda-sp measures each layer with the earlier ones pruned by its per-layer rule: the authors' unit
    count for ``wanda-sp-units``, the per-layer parameter rule otherwise (one MLP keep ratio, since the
    layers of every supported family share one shape).
    """
    if method == "magnitude":
        return compute_metric(model, space, "magnitude")
    if method == "taylor":
        return taylor_scores(model, batches, progress)
    if method.startswith("flap"):
        return flap_statistics(model, batches, progress)
    if method == "shortgpt":
        return block_influence(model, space, batches, progress)
    mlp_keep = None
    if method != "wanda-sp-units":
        mlp_keep = 1.0 - sum(ch for _, ch in per_layer_removed(space, sparsity)) / space.num_mlp_units
    return compute_metric(model, space, "wanda-sp", batches, keep_ratio=1.0 - sparsity, mlp_keep_ratio=mlp_keep,
                          progress=progress)


def baseline_masks(
    model: nn.Module,
    method: str,
    sparsity: float = 0.3,
    batches: Sequence[torch.Tensor] = (),
    seed: int = 42,
    cache: dict | None = None,
    progress: bool = True,
) -> Baseline:
    """Select the units ``method`` (one of :data:`BASELINES`) removes at ``sparsity``, the fraction of the
    prunable parameters (the module docstring says how each method meets it).

    ``batches`` (``[B, T]`` token ids) are the calibration data of the data-driven methods
    (:data:`DATA_DRIVEN`); ``seed`` seeds ``random``. ``cache``: pass one dict to several calls on the
    same model and batches to reuse the statistics (magnitudes, Taylor gradients, FLAP statistics and
    block influence once; Wanda-sp once per sparsity, shared by ``wanda-sp`` and ``wanda-sp-global``).
    The model is not modified; prune with ``core.removal.prune_model(model, result.masks)``, after
    ``refit`` if the surviving weights are to be repaired.
    """
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; choose one of {', '.join(BASELINES)}")
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} must be in (0, 1): the fraction of the prunable parameters removed")
    if method in DATA_DRIVEN and not batches:
        raise ValueError(f"the {method} baseline needs calibration batches")
    structure = STRUCTURES[method]
    space = SearchSpace.from_model(model)
    cache = {} if cache is None else cache
    key = _statistics_key(method, sparsity)
    reused = key is not None and key in cache
    if key is not None and not reused:
        cache[key] = _statistics(model, space, method, batches, sparsity, progress)
    statistics = cache.get(key)
    if method == "random":
        scores = compute_metric(model, space, "random", seed=seed)
    elif method.startswith("flap"):
        scores = flap_scores(statistics, space)
    elif method == "shortgpt":
        scores = UnitValues(torch.ones(space.num_attn_units), torch.ones(space.num_mlp_units),
                            statistics.layer.clone(), statistics.layer.clone())
    else:
        scores = statistics
    if structure == "AL-AM":
        masks = select_joint(scores, space, sparsity)
    elif structure == "layers":
        masks = select_layers(statistics, space, sparsity)
    else:
        masks = select_units(scores, space, sparsity, structure)
    return Baseline(method, masks, scores, structure, removed_fraction(space, masks), reused)


# ------------------------------------------------------------------------------------------------ depth

def _lowest(values: torch.Tensor, count: int) -> torch.Tensor:
    """0/1 keep mask over ``values`` removing the ``count`` lowest."""
    keep = torch.ones(values.numel())
    keep[torch.argsort(values, stable=True)[:count]] = 0.0
    return keep


def block_influence_masks(influence: BlockInfluence, space: SearchSpace, removed_attn: int,
                          removed_mlp: int) -> UnitValues:
    """Remove the ``removed_attn`` attention blocks and ``removed_mlp`` MLP blocks of lowest influence."""
    if not (0 <= removed_attn <= space.num_layers and 0 <= removed_mlp <= space.num_layers):
        raise ValueError(f"block counts must lie in [0, {space.num_layers}]")
    if removed_attn == removed_mlp == space.num_layers:
        raise ValueError("removing every block leaves no decoder layer")
    return UnitValues(torch.ones(space.num_attn_units), torch.ones(space.num_mlp_units),
                      _lowest(influence.attn, removed_attn), _lowest(influence.mlp, removed_mlp))


def layer_influence_masks(influence: BlockInfluence, space: SearchSpace, removed_layers: int) -> UnitValues:
    """ShortGPT: remove the ``removed_layers`` whole decoder layers of lowest influence."""
    if not 0 <= removed_layers < space.num_layers:
        raise ValueError(f"removed_layers must lie in [0, {space.num_layers - 1}]: one layer must stay")
    keep = _lowest(influence.layer, removed_layers)
    return UnitValues(torch.ones(space.num_attn_units), torch.ones(space.num_mlp_units), keep, keep.clone())
