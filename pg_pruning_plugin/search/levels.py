"""The level table: every layer's units ranked once, and the weights of each candidate width.

The allocation policy (search/allocation.py) decides *how many* units each layer keeps; this table
decides *which* and with what weights. It is built by one sequential pass over the calibration text
(refit/statistics.py) with the model pruned at a ``reference`` allocation: in layer ``l`` the input
statistics ``H`` of ``o_proj`` and ``down_proj`` are those of the model already pruned (and refitted)
at the reference widths in layers ``< l``. From them, per layer:

* a ranking of the KV groups and of the MLP channels (``ranking="obs"``: greedy OBS removal order,
  scoring/obs.py, which keeps the units the refit cannot replace; or the order of an importance
  metric);
* for every *level* ``k`` in a band around the reference (``k`` kept KV groups; ``k · block`` kept MLP
  channels), the output-projection weights of the best-ranked units: re-fitted by least squares to
  the dense layer's output (``loop_refit="lstsq"``), the plain kept columns plus FLAP's mean bias
  (``"bias"``), or the plain kept columns (``"none"``).

A candidate allocation then runs as a sub-network with these weights (core/subnetwork.py), so the
search scores the model that is shipped after the final refit, at the cost of one forward pass.
Memory: the band's weights, ``Σ_levels hidden · kept`` values per projection and layer, kept on the
layer's device in the model's dtype.

Under a process group the pass runs on every rank's calibration shard (refit/statistics.py) and the
statistics are summed over the ranks before anything is ranked or fitted, so every rank builds the
same table. Offloaded projections (accelerate) are loaded by their hooks while their layer is
processed (core/offload.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..core.architectures import SearchSpace, decoder_layers
from ..core.modeling import eval_mode
from ..core.offload import onloaded
from ..core.subnetwork import OutputWeights
from ..core.units import UnitValues
from ..refit.lstsq import lstsq_weights
from ..refit.statistics import InputStatistics, LayerStream
from ..scoring.metrics import compute_metric
from ..scoring.obs import obs_order

__all__ = ["LOOP_REFITS", "RANKINGS", "LayerLevels", "LevelTable", "reference_levels"]

logger = logging.getLogger(__name__)

RANKINGS = ("obs", "wanda-sp", "magnitude")
LOOP_REFITS = ("lstsq", "bias", "none")


def reference_levels(space: SearchSpace, block: int, keep_params: float) -> torch.Tensor:
    """``[L, 2]`` uniform levels (KV groups, MLP blocks) that keep at most ``keep_params`` prunable
    parameters: every layer keeps ``ceil(f · n_kv)`` KV groups (``f`` the kept fraction; the coarse unit
    is rounded up) and as many MLP blocks as the rest of the budget pays for, the remainder spread
    one block at a time from the first layer on."""
    fraction = keep_params / space.prunable_parameters()
    levels = torch.zeros(space.num_layers, 2, dtype=torch.long)
    price = level_prices(space, block)
    n_max = level_counts(space, block)
    for i, shape in enumerate(space.layers):
        levels[i, 0] = min(shape.num_kv_groups, max(1, math.ceil(fraction * shape.num_kv_groups - 1e-9)))
    rest = keep_params - float((levels[:, 0] * price[:, 0]).sum())
    per_layer = rest / space.num_layers
    levels[:, 1] = torch.clamp((per_layer / price[:, 1]).floor().long(), min=1)
    levels[:, 1] = torch.minimum(levels[:, 1], n_max[:, 1])
    spare = keep_params - float((levels * price).sum())
    for i in range(space.num_layers):
        if spare >= price[i, 1] and levels[i, 1] < n_max[i, 1]:
            levels[i, 1] += 1
            spare -= float(price[i, 1])
    while float((levels * price).sum()) > keep_params and int(levels[:, 1].max()) > 1:  # a tight budget
        i = int(torch.argmax(levels[:, 1]))
        levels[i, 1] -= 1
    return levels


def level_counts(space: SearchSpace, block: int) -> torch.Tensor:
    """``[L, 2]`` number of levels per layer: KV groups, and MLP blocks (``ceil(I / block)``; the last level
    of a width that ``block`` does not divide is the whole width)."""
    return torch.tensor([[s.num_kv_groups, math.ceil(s.intermediate_size / block)] for s in space.layers],
                        dtype=torch.long)


def level_prices(space: SearchSpace, block: int) -> torch.Tensor:
    """``[L, 2]`` prunable parameters of one level: one KV group, one block of ``block`` MLP channels."""
    return torch.tensor([[space.params_per_attn_unit(i), block * space.params_per_mlp_unit()]
                         for i in range(space.num_layers)], dtype=torch.long)


def channels_of(level: int, block: int, width: int) -> int:
    """MLP channels kept at ``level`` blocks (the whole width at the last level)."""
    return min(width, level * block)


@dataclass
class LayerLevels:
    """One layer's rankings (most important first) and, per level in the band, its output weights."""

    attn_order: torch.Tensor  # [n_kv] KV groups
    mlp_order: torch.Tensor  # [I] channels
    attn: dict[int, OutputWeights] = field(default_factory=dict)  # kept KV groups -> o_proj weights
    mlp: dict[int, OutputWeights] = field(default_factory=dict)  # kept MLP blocks -> down_proj weights


class LevelTable:
    """Rankings and per-level weights of every layer (module docstring); :meth:`masks` and
    :meth:`weights` turn an allocation into what the sub-network runs."""

    def __init__(self, space: SearchSpace, block: int, layers: list[LayerLevels], band: torch.Tensor):
        self.space, self.block, self.layers = space, block, layers
        self.band = band  # [L, 2, 2] lowest and highest level with weights (inclusive)
        self.n_max = level_counts(space, block)
        self.price = level_prices(space, block)

    def in_band(self, levels: torch.Tensor) -> bool:
        return bool(((levels >= self.band[..., 0]) & (levels <= self.band[..., 1])).all())

    def masks(self, levels: torch.Tensor) -> UnitValues:
        """0/1 masks keeping each layer's ``levels[l, 0]`` best KV groups and ``levels[l, 1]`` best MLP blocks."""
        space = self.space
        attn, mlp = torch.zeros(space.num_attn_units), torch.zeros(space.num_mlp_units)
        for i, (layer, shape) in enumerate(zip(self.layers, space.layers)):
            attn[space.attn_offsets[i] + layer.attn_order[: int(levels[i, 0])]] = 1.0
            kept = channels_of(int(levels[i, 1]), self.block, shape.intermediate_size)
            mlp[space.mlp_offsets[i] + layer.mlp_order[:kept]] = 1.0
        return UnitValues(attn, mlp)

    def weights(self, levels: torch.Tensor) -> dict[tuple[int, str], OutputWeights]:
        """Output-projection weights of every layer at ``levels`` (for ``core.subnetwork``); full levels and
        ``loop_refit="none"`` levels have none (the sub-network slices the original weights)."""
        out = {}
        for i, layer in enumerate(self.layers):
            for kind, table, level in (("attn", layer.attn, int(levels[i, 0])), ("mlp", layer.mlp, int(levels[i, 1]))):
                if table.get(level) is not None:
                    out[(i, kind)] = table[level]
        return out

    @classmethod
    @torch.no_grad()
    def build(cls, model: nn.Module, batches: Sequence[torch.Tensor | dict[str, torch.Tensor]],
              reference: torch.Tensor, block: int = 64, band: int = 8, ranking: str = "obs",
              loop_refit: str = "lstsq", damping: float = 0.01, progress: bool = True) -> LevelTable:
        """One sequential pass at the ``reference`` levels (``[L, 2]``); see the module docstring. The model is
        unchanged afterwards. ``band``: levels on each side of the reference that get weights (MLP);
        every KV-group level gets them."""
        if ranking not in RANKINGS:
            raise ValueError(f"ranking={ranking!r}; choose one of {', '.join(RANKINGS)}")
        if loop_refit not in LOOP_REFITS:
            raise ValueError(f"loop_refit={loop_refit!r}; choose one of {', '.join(LOOP_REFITS)}")
        space = SearchSpace.from_model(model)
        spec = space.spec
        n_max = level_counts(space, block)
        metric = None
        if ranking != "obs":
            ids = [b["input_ids"] if isinstance(b, dict) else b for b in batches]
            keep = float((reference * level_prices(space, block)).sum()) / space.prunable_parameters()
            metric = compute_metric(model, space, ranking, ids, keep_ratio=keep, progress=progress)
        layers_out: list[LayerLevels] = []
        bands = torch.zeros(space.num_layers, 2, 2, dtype=torch.long)
        modules = decoder_layers(model)
        with eval_mode(model):
            stream = LayerStream(model, batches)
            for i in tqdm(range(space.num_layers), desc="level table", disable=not progress, leave=False):
                attn, mlp = getattr(modules[i], spec.attention), getattr(modules[i], spec.mlp)
                o_proj, down_proj = getattr(attn, spec.o), getattr(mlp, spec.down)
                with onloaded(o_proj), onloaded(down_proj):  # offloaded weights: read and changed here
                    shape = space.layers[i]
                    originals = (o_proj.weight.detach().clone(), down_proj.weight.detach().clone())
                    entry = LayerLevels(torch.arange(shape.num_kv_groups), torch.arange(shape.intermediate_size))
                    width = shape.queries_per_group * shape.head_dim
                    # attention: statistics on the stream pruned up to layer i - 1
                    with InputStatistics(o_proj, f"layer {i} {spec.o}") as o_stats:
                        stream.run_until(i, o_proj)
                    o_stats.all_reduce()
                    entry.attn_order = (obs_order(o_proj.weight, o_stats.gram, width, damping) if metric is None else
                                        torch.argsort(metric.attn[space.attn_slice(i)], descending=True, stable=True))
                    lo, hi = 1, int(n_max[i, 0])
                    bands[i, 0] = torch.tensor([lo, hi])
                    projected = _projected(o_proj.weight, o_stats, loop_refit)
                    for level in range(lo, hi + 1):
                        groups = torch.sort(entry.attn_order[:level]).values
                        columns = (groups[:, None] * width + torch.arange(width)).flatten()
                        entry.attn[level] = _level_weights(o_proj.weight, o_stats, columns, loop_refit, damping,
                                                           full=level == shape.num_kv_groups, projected=projected)
                    o_bias = _write(o_proj, entry.attn.get(int(reference[i, 0])),
                                    _columns(entry.attn_order, int(reference[i, 0]), width))
                    # MLP: statistics after this layer's attention is pruned at the reference
                    with InputStatistics(down_proj, f"layer {i} {spec.down}") as d_stats:
                        stream.run_until(i, down_proj)
                    d_stats.all_reduce()
                    entry.mlp_order = (obs_order(down_proj.weight, d_stats.gram, 1, damping) if metric is None else
                                       torch.argsort(metric.mlp[space.mlp_slice(i)], descending=True, stable=True))
                    ref = int(reference[i, 1])
                    lo, hi = max(1, ref - band), min(int(n_max[i, 1]), ref + band)
                    bands[i, 1] = torch.tensor([lo, hi])
                    projected = _projected(down_proj.weight, d_stats, loop_refit)
                    for level in range(lo, hi + 1):
                        kept = channels_of(level, block, shape.intermediate_size)
                        channels = torch.sort(entry.mlp_order[:kept]).values
                        entry.mlp[level] = _level_weights(down_proj.weight, d_stats, channels, loop_refit, damping,
                                                          full=kept == shape.intermediate_size, projected=projected)
                    del projected
                    down_bias = _write(down_proj, entry.mlp.get(ref),
                                       _columns(entry.mlp_order, channels_of(ref, block, shape.intermediate_size), 1))
                    stream.advance(i)
                    _restore(o_proj, originals[0], o_bias)
                    _restore(down_proj, originals[1], down_bias)
                    layers_out.append(entry)
                    del o_stats, d_stats
        return cls(space, block, layers_out, bands)


def _columns(order: torch.Tensor, kept_units: int, width: int) -> torch.Tensor:
    units = torch.sort(order[:kept_units]).values
    return (units[:, None] * width + torch.arange(width)).flatten()


def _projected(weight: torch.Tensor, stats: InputStatistics, loop_refit: str) -> torch.Tensor | None:
    """``W H`` (``[out, n]``, float64), shared by the least-squares fits of every level of one projection."""
    if loop_refit != "lstsq":
        return None
    return weight.detach().to(stats.gram.device, torch.float64) @ stats.gram


def _level_weights(weight: torch.Tensor, stats: InputStatistics, columns: torch.Tensor, loop_refit: str,
                   damping: float, full: bool, projected: torch.Tensor | None = None) -> OutputWeights | None:
    """The output weights of one level (``None``: the sub-network's own slice of the original weights);
    ``projected``: :func:`_projected` of this projection."""
    if full or loop_refit == "none":
        return None
    columns = columns.to(stats.gram.device)
    if loop_refit == "bias":
        removed = torch.ones(weight.shape[1], dtype=torch.bool, device=stats.gram.device)
        removed[columns] = False
        bias = weight.detach().double() @ torch.where(removed, stats.mean, 0.0)
        return OutputWeights(None, bias.to(weight.dtype))
    return OutputWeights(lstsq_weights(weight, stats.gram, columns, damping, projected=projected).to(weight.dtype),
                         None)


@torch.no_grad()
def _write(linear: nn.Linear, level: OutputWeights | None, columns: torch.Tensor) -> nn.Parameter | None:
    """Make ``linear`` compute the reference level (removed columns zero) while the stream advances; returns
    its original bias, for :func:`_restore`."""
    columns = columns.to(linear.weight.device)
    new = torch.zeros_like(linear.weight)
    new[:, columns] = linear.weight[:, columns] if level is None or level.weight is None else level.weight
    linear.weight.copy_(new)
    original = linear.bias
    if level is not None and level.bias is not None:
        added = level.bias if original is None else original.detach() + level.bias
        linear.bias = nn.Parameter(added.clone(), requires_grad=False)
    return original


@torch.no_grad()
def _restore(linear: nn.Linear, weight: torch.Tensor, bias: nn.Parameter | None) -> None:
    linear.weight.copy_(weight)
    linear.bias = bias
