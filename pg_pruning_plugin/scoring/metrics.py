"""Initial per-unit importance metrics from forward statistics only (no backpropagation).

* ``wanda-sp``: ``|W| ⊙ sqrt(a)`` of o_proj/down_proj with ``a_c`` the mean squared norm of input
  channel c; computed layer by layer, each layer seeing the previous layers with their per-layer
  uniform init mask applied (method.md §7.1). Attention: sum over a head's ``d`` channels, mean
  over the ``n_rep`` query heads of a KV group.
* ``wifv``: FLAP's weighted input-feature variance ``Var_t(x_c) · ‖W_{:,c}‖²``, grouped the same way
  (also layer by layer under the init mask). The FLAP *baseline* (scoring/baselines.py) groups the same
  per-channel values differently (squared, standardised, mean over a KV group's channels), so it is
  named ``flap`` and this metric is not.
* ``magnitude``: squared L2 norm of all weights coupled to the unit (q/k/v rows + o columns, or
  gate/up rows + down column): Torch-Pruning's group magnitude with sum reduction.
* ``random``: standard-normal noise (seeded); ``constant``: all equal.

Higher means more important everywhere.

Under a process group (core/distributed.py) every rank passes the same calibration batches, runs its
contiguous shard of them, and the statistics are summed over the ranks (one collective per layer for
the layer-by-layer metrics, one for block influence), so every rank returns the metric of all the
text. Weights of projections that accelerate offloads are read through their hooks (core/offload.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..core import distributed
from ..core.architectures import SearchSpace, decoder_layers
from ..core.masking import masked
from ..core.modeling import eval_mode, model_device
from ..core.offload import onloaded
from ..core.selection import top_k_mask
from ..core.units import UnitValues

__all__ = ["METRICS", "BlockInfluence", "InputStats", "block_influence", "compute_metric", "unit_weight_sums",
           "weighted_input_variance"]

logger = logging.getLogger(__name__)

METRICS = ("wanda-sp", "wifv", "magnitude", "random", "constant")


class InputStats:
    """Per-input-channel running sum, sum of squares and token count of a Linear's input."""

    def __init__(self, module: nn.Linear):
        n = module.in_features
        self.sum = torch.zeros(n, dtype=torch.float64)
        self.sq = torch.zeros(n, dtype=torch.float64)
        self.tokens = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double().cpu()  # [tokens, C]
        self.sum += x.sum(0)
        self.sq += (x * x).sum(0)
        self.tokens += x.shape[0]

    def mean_sq(self) -> torch.Tensor:
        return self.sq / max(self.tokens, 1)

    def variance(self) -> torch.Tensor:
        mean = self.sum / max(self.tokens, 1)
        return (self.sq / max(self.tokens, 1) - mean * mean).clamp_min(0)


def all_reduce_input_stats(stats: Sequence[InputStats], what: str = "input statistics") -> None:
    """Sum ``stats`` (their sums, squares and token counts) over the ranks in one collective; no-op without
    a process group."""
    if not distributed.is_distributed():
        return
    counts = torch.tensor([float(s.tokens) for s in stats], dtype=torch.float64)
    distributed.all_reduce_stats([t for s in stats for t in (s.sum, s.sq)] + [counts], what)
    for s, count in zip(stats, counts.tolist()):
        s.tokens = int(count)


def weighted_input_variance(stats: InputStats, weight: torch.Tensor) -> torch.Tensor:
    """FLAP's per-input-channel metric ``Var_t(x_c) · ‖W_{:,c}‖²`` (float64), from a Linear's input statistics."""
    return stats.variance() * weight.detach().double().cpu().pow(2).sum(0)


def _per_channel(method: str, stats: InputStats, weight: torch.Tensor) -> torch.Tensor:
    if method == "wanda-sp":
        return (weight.detach().double().cpu().abs() * stats.mean_sq().sqrt()[None, :]).mean(0)
    return weighted_input_variance(stats, weight)  # wifv


def _group_heads(per_channel: torch.Tensor, n_kv: int, n_rep: int, head_dim: int) -> torch.Tensor:
    """[n_q·d] channel values -> [n_kv]: sum over each head's d channels, mean over a group's heads."""
    return per_channel.view(n_kv, n_rep, head_dim).sum(-1).mean(-1)


def unit_weight_sums(model: nn.Module, space: SearchSpace,
                     value: Callable[[nn.Linear], torch.Tensor]) -> UnitValues:
    """Per unit, the sum of the elementwise ``value(linear)`` over its coupled weights (float64 on the CPU):
    a KV group's q/k/v rows and o columns, an MLP channel's gate/up rows and down column."""
    spec = space.spec
    attn, mlp = [], []
    for layer, shape in zip(decoder_layers(model), space.layers):
        a, m = getattr(layer, spec.attention), getattr(layer, spec.mlp)
        n_kv = shape.num_kv_groups

        def summed(linear: nn.Linear, dim: int) -> torch.Tensor:
            with onloaded(linear):
                return value(linear).double().cpu().sum(dim)

        attn.append(sum(summed(getattr(a, name), 1).view(n_kv, -1).sum(1) for name in (spec.q, spec.k, spec.v))
                    + summed(getattr(a, spec.o), 0).view(n_kv, -1).sum(1))
        mlp.append(summed(getattr(m, spec.gate), 1) + summed(getattr(m, spec.up), 1) + summed(getattr(m, spec.down), 0))
    return UnitValues(torch.cat(attn), torch.cat(mlp))


def _squared_weights(linear: nn.Linear) -> torch.Tensor:
    return linear.weight.detach().double().pow(2)


def _capture_layer_inputs(model: nn.Module, batches: Sequence[torch.Tensor]) -> tuple[list, list]:
    """Hidden states entering layer 0 and each layer's keyword arguments, per batch (one dense pass)."""
    layers = decoder_layers(model)
    hidden, kwargs = [], [[None] * len(layers) for _ in batches]
    current = {}

    def make_hook(i: int):
        def hook(module, args, kw):
            if i == 0:
                hidden.append(args[0] if args else kw.pop("hidden_states"))
            kw = dict(kw)
            kw.pop("hidden_states", None)
            kwargs[current["batch"]][i] = (args[1:], kw)

        return hook

    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for b, ids in enumerate(batches):
            current["batch"] = b
            model(input_ids=ids.to(model_device(model)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return hidden, kwargs


@torch.no_grad()
def compute_metric(
    model: nn.Module,
    space: SearchSpace,
    method: str,
    batches: Sequence[torch.Tensor] = (),
    keep_ratio: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    mlp_keep_ratio: float | None = None,
) -> UnitValues:
    """Per-unit importance of ``method`` (one of :data:`METRICS`).

    Activation metrics need calibration ``batches`` (``[B, T]`` token ids; under a process group the
    same on every rank, each rank measuring its shard) and use ``keep_ratio`` for the per-layer init
    mask applied to earlier layers while later layers are measured; ``mlp_keep_ratio`` (default
    ``keep_ratio``) is the MLP channels' share in that mask.
    """
    if method not in METRICS:
        raise ValueError(f"unknown init metric {method!r}; choose one of {', '.join(METRICS)}")
    if method == "magnitude":
        return unit_weight_sums(model, space, _squared_weights).map(torch.Tensor.float)
    if method == "random":
        g = torch.Generator().manual_seed(seed)
        return UnitValues(torch.randn(space.num_attn_units, generator=g), torch.randn(space.num_mlp_units, generator=g))
    if method == "constant":
        return UnitValues(torch.ones(space.num_attn_units), torch.ones(space.num_mlp_units))
    if not batches:
        raise ValueError(f"the {method} metric needs calibration batches")

    with eval_mode(model):
        return _layerwise_metric(model, space, method, batches, keep_ratio,
                                 keep_ratio if mlp_keep_ratio is None else mlp_keep_ratio, progress)


def _layerwise_metric(model: nn.Module, space: SearchSpace, method: str, batches: Sequence[torch.Tensor],
                      keep_ratio: float, mlp_keep_ratio: float, progress: bool) -> UnitValues:
    """An activation metric measured layer by layer, each layer seeing the earlier ones under their init mask."""
    spec = space.spec
    hidden, layer_kwargs = _capture_layer_inputs(model, distributed.shard(batches))
    attn_scores, mlp_scores = [], []
    layers = decoder_layers(model)
    for i, layer in enumerate(tqdm(layers, desc=f"{method} metric", disable=not progress, leave=False)):
        shape = space.layers[i]
        o_proj = getattr(getattr(layer, spec.attention), spec.o)
        down_proj = getattr(getattr(layer, spec.mlp), spec.down)
        o_stats, down_stats = InputStats(o_proj), InputStats(down_proj)
        try:
            for b, h in enumerate(hidden):
                args, kw = layer_kwargs[b][i]
                layer(h, *args, **kw)
        finally:
            o_stats.handle.remove()
            down_stats.handle.remove()
        all_reduce_input_stats([o_stats, down_stats], f"the {method} statistics of layer {i}")
        with onloaded(o_proj), onloaded(down_proj):
            attn = _group_heads(_per_channel(method, o_stats, o_proj.weight), shape.num_kv_groups,
                                shape.queries_per_group, shape.head_dim)
            mlp = _per_channel(method, down_stats, down_proj.weight)
        attn_scores.append(attn.float())
        mlp_scores.append(mlp.float())
        # Propagate through this layer with its per-layer uniform init mask (a one-layer search space).
        layer_masks = UnitValues(
            top_k_mask(attn, keep_ratio, [0, attn.numel()], global_pool=False),
            top_k_mask(mlp, mlp_keep_ratio, [0, mlp.numel()], global_pool=False),
        )
        one_layer = _single_layer_space(space, i)
        with masked(_LayerAsModel(layer), one_layer, layer_masks):
            for b, h in enumerate(hidden):
                args, kw = layer_kwargs[b][i]
                out = layer(h, *args, **kw)
                hidden[b] = out[0] if isinstance(out, tuple) else out
    return UnitValues(torch.cat(attn_scores), torch.cat(mlp_scores))


class _LayerAsModel(nn.Module):
    """Presents one decoder layer as a model with ``model.layers == [layer]`` for :func:`masked`."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList([layer])


def _single_layer_space(space: SearchSpace, i: int) -> SearchSpace:
    return SearchSpace(space.spec, [space.layers[i]], space.hidden_size, space.model_type)


@dataclass
class BlockInfluence:
    """Block influence (ShortGPT, Men et al. 2024): ``1 − cos(x_in, x_out)`` of the residual stream
    across a block, averaged over tokens; higher means the block changes more (more important)."""

    attn: torch.Tensor  # [L] across each attention block
    mlp: torch.Tensor  # [L] across each MLP block
    layer: torch.Tensor  # [L] across each whole decoder layer


class _CosineMean:
    def __init__(self, num_layers: int):
        self.sum = torch.zeros(num_layers, dtype=torch.float64)
        self.tokens = torch.zeros(num_layers, dtype=torch.float64)

    def add(self, i: int, a: torch.Tensor, b: torch.Tensor) -> None:
        cos = torch.nn.functional.cosine_similarity(a.double().flatten(0, -2), b.double().flatten(0, -2), dim=-1)
        self.sum[i] += float(cos.sum())
        self.tokens[i] += cos.numel()

    def influence(self) -> torch.Tensor:
        return (1 - self.sum / self.tokens.clamp_min(1)).float()


@torch.no_grad()
def block_influence(model: nn.Module, space: SearchSpace, batches: Sequence[torch.Tensor],
                    progress: bool = True) -> BlockInfluence:
    """:class:`BlockInfluence` of every attention block, MLP block and decoder layer (dense forwards).

    The residual stream between the two blocks is the input of ``spec.mlp_norm``. Under a process group
    each rank runs its shard of ``batches`` and the sums are added over the ranks (one collective).
    """
    if not batches:
        raise ValueError("block influence needs calibration batches")
    spec, layers = space.spec, decoder_layers(model)
    attn, mlp, whole = (_CosineMean(len(layers)) for _ in range(3))
    inputs, middles, handles = {}, {}, []

    def layer_pre(i):
        def hook(module, args, kwargs):
            inputs[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def norm_pre(i):
        def hook(module, args):
            middles[i] = args[0]
            attn.add(i, inputs[i], args[0])
        return hook

    def layer_post(i):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            mlp.add(i, middles[i], out)
            whole.add(i, inputs[i], out)
        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(layer_pre(i), with_kwargs=True))
        handles.append(getattr(layer, spec.mlp_norm).register_forward_pre_hook(norm_pre(i)))
        handles.append(layer.register_forward_hook(layer_post(i), with_kwargs=True))
    try:
        with eval_mode(model):
            for ids in tqdm(distributed.shard(batches), desc="block influence", disable=not progress, leave=False):
                model(input_ids=ids.to(model_device(model)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    distributed.all_reduce_stats([t for m in (attn, mlp, whole) for t in (m.sum, m.tokens)], "block influence")
    return BlockInfluence(attn.influence(), mlp.influence(), whole.influence())
