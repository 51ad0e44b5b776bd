"""Baseline pruners in the policy-gradient search space: they pick KV groups and MLP channels.

Every baseline returns 0/1 :class:`~pg_pruning_plugin.core.units.UnitValues` masks over the same units
as :class:`~pg_pruning_plugin.search.loop.PolicyGradientSearch`, so ``core.removal.prune_model`` removes
them. The budget is given the same way as :class:`~pg_pruning_plugin.search.config.SearchConfig` gives it:
the fraction of KV groups and the fraction of MLP channels removed.

Methods (:data:`BASELINES`); higher scores mean "keep":

* ``random``: seeded standard-normal scores (``metrics.compute_metric(..., "random")``).
* ``magnitude``: Torch-Pruning's group magnitude importance with ``p=2``, ``group_reduction="sum"``,
  no normalizer, i.e. the sum of squared weights over each unit's coupled q/k/v rows and o columns
  (or gate/up rows and the down column), each weight counted once (``compute_metric(..., "magnitude")``).
  No data.
* ``wanda-sp``: ``compute_metric(..., "wanda-sp")`` (``|W|·sqrt(E[x²])`` of o_proj/down_proj, measured
  layer by layer with earlier layers already pruned), kept per layer: the same fraction in every layer
  (the FLAP repository's Wanda-sp and the authors' init mask).
* ``flap``: FLAP (An et al., AAAI'24). Weighted input-feature variance ``Var(x_c)·‖W[:, c]‖²`` of
  o_proj/down_proj from one dense pass (squared for attention, as the FLAP code does), standardised
  within each layer per module type, averaged over a KV group's channels, then ranked across all
  layers per type (FLAP's adaptive structure with the budget split per type, its ``AL-MM``), with
  bias compensation (:func:`flap_biases`). The init metric ``wifv`` (scoring/metrics.py) is the same
  per-channel value grouped as Wanda-sp groups it.
* ``flap-joint``: the same with FLAP's default ``AL-AM`` structure: attention and MLP units in one
  ranking, each weighted by its parameter count; the *prunable-parameter* fraction removed matches
  (the KV-group / channel fractions then differ from the search's).
* ``taylor``: LLM-Pruner's first-order Taylor importance (``param_first``, ``sum`` grouping):
  ``Σ |w · ∂L/∂w|`` over each unit's coupled weights, with ``L`` the mean next-token cross-entropy
  over the calibration batches (one backward per batch, gradients accumulated).

Selection (:data:`STRUCTURES`): ``uniform`` keeps ``kept_count(n, r)`` units in every layer (as
``core.selection.top_k_mask(..., global_pool=False)``); ``global`` keeps exactly ``kept_count(n, r)`` units
of each type over all layers (the search's count, core/selection.py), the best unit of each layer always
among them.
Note that ``uniform`` cannot hit small fractions of few units: with 3 KV groups per layer, 30 %
removes none.

Depth baselines (whole blocks; compare with ``SearchConfig(granularity="depth")``) use the block
influence of ShortGPT (Men et al., 2024), ``1 − cos(x_in, x_out)`` across a block
(:func:`~pg_pruning_plugin.scoring.metrics.block_influence`): :func:`block_influence_masks` removes given
numbers of attention and MLP blocks with the lowest influence; :func:`layer_influence_masks` removes whole
decoder layers (ShortGPT itself).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..core.architectures import SearchSpace, decoder_layers, projections
from ..core.modeling import eval_mode, model_device, next_token_losses
from ..core.selection import kept_count, top_k_mask
from ..core.units import UnitValues
from .metrics import BlockInfluence, InputStats, compute_metric, unit_weight_sums, weighted_input_variance

__all__ = [
    "BASELINES",
    "DATA_DRIVEN",
    "STRUCTURES",
    "Baseline",
    "FlapStatistics",
    "apply_biases",
    "baseline_masks",
    "block_influence_masks",
    "layer_influence_masks",
    "flap_biases",
    "flap_scores",
    "flap_statistics",
    "select_joint",
    "select_units",
    "taylor_scores",
]

logger = logging.getLogger(__name__)

BASELINES = ("random", "magnitude", "wanda-sp", "flap", "flap-joint", "taylor")
DATA_DRIVEN = ("wanda-sp", "flap", "flap-joint", "taylor")
STRUCTURES = ("uniform", "global")
DEFAULT_STRUCTURE = {"random": "global", "magnitude": "global", "wanda-sp": "uniform", "flap": "global",
                     "taylor": "global"}

# Config switches that give o_proj/down_proj a bias in the stock modeling code (all projections then
# have one), so a compensated checkpoint saves and loads with save_pruned/load_pruned/from_pretrained.
_BIAS_SWITCHES = {"llama": ("attention_bias", "mlp_bias")}


@dataclass
class Baseline:
    """A baseline's selection: 0/1 ``masks``, the ranking ``scores`` behind them, and for FLAP the
    per-layer ``(o_proj, down_proj)`` bias compensation (``[hidden]`` each) to add after pruning."""

    method: str
    masks: UnitValues
    scores: UnitValues
    structure: str
    biases: list[tuple[torch.Tensor, torch.Tensor]] | None = None


# ------------------------------------------------------------------------------------------- selection

def _reserve_best(s: torch.Tensor, offsets: Sequence[int]) -> torch.Tensor:
    """``s`` with each layer's best unit raised to +inf (it survives any global cut)."""
    s = s.double().clone()
    for a, b in zip(offsets[:-1], offsets[1:]):
        s[a + int(torch.argmax(s[a:b]))] = float("inf")
    return s


def select_units(scores: UnitValues, space: SearchSpace, attn_keep: float, mlp_keep: float,
                 structure: str) -> UnitValues:
    """0/1 masks keeping the highest scores per type: per layer (``uniform``) or over all layers
    (``global``: exactly ``n − int(n·(1−keep))`` units, at least one per layer)."""
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}; choose one of {', '.join(STRUCTURES)}")
    glob = structure == "global"

    def one(s: torch.Tensor, keep: float, offsets: list[int]) -> torch.Tensor:
        n, layers = offsets[-1], len(offsets) - 1
        if glob and kept_count(n, keep) < layers:
            raise ValueError(f"keeping {keep:.0%} of {n} units leaves fewer than one per layer ({layers} layers)")
        return top_k_mask(s, keep, offsets, global_pool=glob)

    return UnitValues(one(scores.attn, attn_keep, space.attn_offsets), one(scores.mlp, mlp_keep, space.mlp_offsets))


def select_joint(scores: UnitValues, space: SearchSpace, keep: float) -> UnitValues:
    """FLAP's ``AL-AM`` cut: one ranking over KV groups and channels of all layers, keeping the prefix
    whose parameter count is closest to ``keep`` of the prunable parameters (≥ 1 unit per layer and type)."""
    attn_w = torch.cat([torch.full((s.num_kv_groups,), float(space.params_per_attn_unit(i)), dtype=torch.float64)
                        for i, s in enumerate(space.layers)])
    mlp_w = torch.full((space.num_mlp_units,), float(space.params_per_mlp_unit()), dtype=torch.float64)
    values = torch.cat([_reserve_best(scores.attn, space.attn_offsets), _reserve_best(scores.mlp, space.mlp_offsets)])
    weights = torch.cat([attn_w, mlp_w])
    order = torch.argsort(values, descending=True, stable=True)
    cumulative = torch.cumsum(weights[order], 0)
    count = int(torch.argmin((cumulative - keep * weights.sum()).abs())) + 1
    count = max(count, 2 * space.num_layers)  # the reserved units
    keep_mask = torch.zeros(values.numel())
    keep_mask[order[:count]] = 1.0
    return UnitValues(keep_mask[:space.num_attn_units], keep_mask[space.num_attn_units:])


# ------------------------------------------------------------------------------------------------ FLAP

@dataclass
class FlapStatistics:
    """Per layer: FLAP's channel metric and mean input of o_proj (``[n_q·d]``) and down_proj (``[I]``)."""

    attn_metric: list[torch.Tensor]
    mlp_metric: list[torch.Tensor]
    o_mean: list[torch.Tensor]
    down_mean: list[torch.Tensor]


@torch.no_grad()
def flap_statistics(model: nn.Module, batches: Sequence[torch.Tensor], progress: bool = True) -> FlapStatistics:
    """One dense pass over ``batches`` (``[B, T]`` ids) recording o_proj/down_proj input statistics.

    Metric (FLAP's ``WIFV``): ``Var_t(x_c)·‖W[:, c]‖²``, squared for o_proj as in the FLAP code.
    Statistics are per token over all calibration tokens (population variance).
    """
    if not batches:
        raise ValueError("FLAP needs calibration batches")
    space = SearchSpace.from_model(model)
    spec = space.spec
    outputs = [(getattr(getattr(layer, spec.attention), spec.o), getattr(getattr(layer, spec.mlp), spec.down))
               for layer in decoder_layers(model)]
    stats = [(InputStats(o), InputStats(d)) for o, d in outputs]
    device = model_device(model)
    try:
        with eval_mode(model):
            for ids in tqdm(batches, desc="FLAP statistics", disable=not progress, leave=False):
                model(input_ids=ids.to(device), use_cache=False)
    finally:
        for pair in stats:
            for s in pair:
                s.handle.remove()
    return FlapStatistics(
        attn_metric=[weighted_input_variance(so, o.weight) ** 2 for (so, _), (o, _) in zip(stats, outputs)],
        mlp_metric=[weighted_input_variance(sd, d.weight) for (_, sd), (_, d) in zip(stats, outputs)],
        o_mean=[so.sum / max(so.tokens, 1) for so, _ in stats],
        down_mean=[sd.sum / max(sd.tokens, 1) for _, sd in stats],
    )


def _standardise(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std()


def flap_scores(stats: FlapStatistics, space: SearchSpace) -> UnitValues:
    """FLAP's adaptive scores: each layer's channel metric standardised per type; a KV group's score
    is the mean over its ``n_rep·d`` standardised channels."""
    attn = [_standardise(m).view(s.num_kv_groups, -1).mean(1) for m, s in zip(stats.attn_metric, space.layers)]
    mlp = [_standardise(m) for m in stats.mlp_metric]
    return UnitValues(torch.cat(attn).float(), torch.cat(mlp).float())


def flap_biases(model: nn.Module, stats: FlapStatistics, masks: UnitValues) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """FLAP's bias compensation from the *dense* ``model``: per layer ``W_o[:, removed] @ E[x][removed]``
    for o_proj and the same for down_proj (``[hidden]`` each, float32)."""
    space = SearchSpace.from_model(model)
    spec = space.spec
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        shape = space.layers[i]
        o = getattr(getattr(layer, spec.attention), spec.o).weight.detach().double().cpu()
        down = getattr(getattr(layer, spec.mlp), spec.down).weight.detach().double().cpu()
        removed_o = (1 - masks.attn[space.attn_slice(i)]).double().repeat_interleave(
            shape.queries_per_group * shape.head_dim)
        removed_mlp = (1 - masks.mlp[space.mlp_slice(i)]).double()
        out.append(((o @ (stats.o_mean[i] * removed_o)).float(), (down @ (stats.down_mean[i] * removed_mlp)).float()))
    return out


def _add_bias(linear: nn.Linear, value: torch.Tensor) -> None:
    value = value.to(linear.weight.device, linear.weight.dtype)
    if linear.bias is None:
        linear.bias = nn.Parameter(value.clone(), requires_grad=linear.weight.requires_grad)
    else:
        linear.bias.data += value


def apply_biases(model: nn.Module, biases: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Add the compensation biases to every layer's o_proj and down_proj, in place.

    Works on the dense (masked) and on the pruned model alike: the biases live on the hidden size.
    For Llama the config is switched to ``attention_bias``/``mlp_bias`` and the other projections get
    zero biases, so ``core.checkpoint.save_pruned`` / ``load_pruned`` (and stock ``from_pretrained`` for
    uniform widths) round-trip the model. Other architectures hard-code bias-free projections: the
    compensated model is correct in memory, but a saved checkpoint would lose the biases (a warning says so).
    """
    space = SearchSpace.from_model(model)
    spec = space.spec
    layers = decoder_layers(model)
    if len(biases) != len(layers):
        raise ValueError(f"{len(biases)} bias pairs for {len(layers)} layers")
    switches = _BIAS_SWITCHES.get(space.model_type)
    for layer, (b_o, b_down) in zip(layers, biases):
        attn, mlp = getattr(layer, spec.attention), getattr(layer, spec.mlp)
        _add_bias(getattr(attn, spec.o), b_o)
        _add_bias(getattr(mlp, spec.down), b_down)
        if switches:
            for parent, name in ((attn, spec.q), (attn, spec.k), (attn, spec.v), (mlp, spec.gate), (mlp, spec.up)):
                lin = getattr(parent, name)
                _add_bias(lin, torch.zeros(lin.out_features))
    config = model.config.get_text_config()
    if switches:
        for key in switches:
            setattr(config, key, True)
    else:
        logger.warning("%s projections have no bias in the stock modeling code: the FLAP compensation is "
                       "in memory only and would be lost by save_pruned", space.model_type)


# ---------------------------------------------------------------------------------------------- Taylor

def taylor_scores(model: nn.Module, batches: Sequence[torch.Tensor], progress: bool = True) -> UnitValues:
    """LLM-Pruner's first-order Taylor importance ``Σ_unit |w · ∂L/∂w|``.

    ``L`` is the mean over ``batches`` of each batch's mean next-token cross-entropy; only the
    q/k/v/o/gate/up/down weights get gradients. The model's ``requires_grad`` flags and ``.grad``
    fields are restored afterwards. Memory: activations of one batch for backprop plus one gradient
    per projection weight.
    """
    if not batches:
        raise ValueError("Taylor importance needs calibration batches")
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
            for ids in tqdm(batches, desc="Taylor gradients", disable=not progress, leave=False):
                ids = ids.to(device)
                loss = next_token_losses(model(input_ids=ids, use_cache=False).logits, ids).mean()
                (loss / len(batches)).backward()
                del loss
        scores = unit_weight_sums(model, space, _first_order_saliency)
    finally:
        for p, flag, grad in zip(params, flags, old_grads):
            p.grad = grad
            p.requires_grad_(flag)
    return scores.map(torch.Tensor.float)


def _first_order_saliency(linear: nn.Linear) -> torch.Tensor:
    """``|w · ∂L/∂w|`` of a projection's weight (float64)."""
    return (linear.weight.detach().double() * linear.weight.grad.double()).abs()


# -------------------------------------------------------------------------------------------- front end

def _budget(sparsity: float, attn_sparsity: float | None, mlp_sparsity: float | None) -> tuple[float, float]:
    keeps = []
    for name, value in (("attn_sparsity", attn_sparsity if attn_sparsity is not None else sparsity),
                        ("mlp_sparsity", mlp_sparsity if mlp_sparsity is not None else sparsity)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name}={value} must be in (0, 1): the fraction of units removed")
        keeps.append(1.0 - value)
    return keeps[0], keeps[1]


def baseline_masks(
    model: nn.Module,
    method: str,
    sparsity: float = 0.3,
    attn_sparsity: float | None = None,
    mlp_sparsity: float | None = None,
    batches: Sequence[torch.Tensor] = (),
    seed: int = 42,
    structure: str | None = None,
    cache: dict | None = None,
    progress: bool = True,
) -> Baseline:
    """Select the units ``method`` (one of :data:`BASELINES`) keeps at the given budget.

    ``batches`` (``[B, T]`` token ids) are the calibration data of the data-driven methods
    (:data:`DATA_DRIVEN`). ``structure`` overrides the default selection (``uniform`` for wanda-sp,
    ``global`` otherwise; ``flap-joint`` has its own). ``cache``: pass one dict to several calls on
    the same model and batches to reuse the ratio-independent statistics (FLAP, Taylor, magnitude).
    The model is not modified; prune with ``core.removal.prune_model(model, result.masks)`` and, for
    FLAP, then ``apply_biases(model, result.biases)``.
    """
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; choose one of {', '.join(BASELINES)}")
    attn_keep, mlp_keep = _budget(sparsity, attn_sparsity, mlp_sparsity)
    if method in DATA_DRIVEN and not batches:
        raise ValueError(f"the {method} baseline needs calibration batches")
    if method == "flap-joint" and abs(attn_keep - mlp_keep) > 1e-9:
        raise ValueError("flap-joint ranks both unit types together: give one sparsity, not separate ones")
    if structure is not None and method == "flap-joint":
        raise ValueError("flap-joint has its own structure (FLAP's AL-AM); do not pass structure")
    structure = structure or DEFAULT_STRUCTURE.get(method, "global")
    space = SearchSpace.from_model(model)
    cache = {} if cache is None else cache

    def cached(key: str, compute: Callable[[], object]):
        if key not in cache:
            cache[key] = compute()
        return cache[key]

    biases = None
    if method == "random":
        scores = compute_metric(model, space, "random", seed=seed)
    elif method == "magnitude":
        scores = cached("magnitude", lambda: compute_metric(model, space, "magnitude"))
    elif method == "wanda-sp":  # propagation under the per-layer mask depends on the ratio: not cached
        if abs(attn_keep - mlp_keep) > 1e-9:
            logger.warning("wanda-sp propagates through earlier layers pruned at one ratio; using %.3f",
                           min(attn_keep, mlp_keep))
        scores = compute_metric(model, space, "wanda-sp", batches, keep_ratio=min(attn_keep, mlp_keep),
                                progress=progress)
    elif method == "taylor":
        scores = cached("taylor", lambda: taylor_scores(model, batches, progress))
    else:
        stats = cached("flap", lambda: flap_statistics(model, batches, progress))
        scores = flap_scores(stats, space)
    if method == "flap-joint":
        structure = "AL-AM"
        masks = select_joint(scores, space, attn_keep)
    else:
        masks = select_units(scores, space, attn_keep, mlp_keep, structure)
    if method.startswith("flap"):
        biases = flap_biases(model, cache["flap"], masks)
    return Baseline(method, masks, scores, structure, biases)


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
