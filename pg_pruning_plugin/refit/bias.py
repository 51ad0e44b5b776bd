"""Output biases for the ``bias`` refit (FLAP's compensation): where they live and how they are saved,
and the same compensation for a sampled mask inside a search (:func:`bias_outputs`).

Llama's modeling code gives every projection a bias when the config sets ``attention_bias`` and
``mlp_bias``; the compensated model then saves and loads with ``save_pruned``/``load_pruned`` (and
stock ``from_pretrained`` for uniform widths): :func:`enable_output_biases` switches them on with zero
biases on the other projections. The other supported families hard-code bias-free output
projections, so their compensated model is correct in memory but a saved checkpoint would lose the
biases (a warning says so).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..core import distributed
from ..core.architectures import SearchSpace, decoder_layers
from ..core.modeling import eval_mode, model_device
from ..core.offload import onloaded
from ..core.subnetwork import OutputWeights
from ..core.units import UnitValues
from .statistics import InputStatistics, all_reduce

__all__ = ["BIAS_SWITCHES", "add_output_bias", "bias_outputs", "enable_output_biases", "output_input_means"]

logger = logging.getLogger(__name__)

# Config switches that give o_proj/down_proj a bias in the stock modeling code (all projections then have one).
BIAS_SWITCHES = {"llama": ("attention_bias", "mlp_bias")}


def _ensure_bias(linear: nn.Linear) -> None:
    if linear.bias is None:
        with onloaded(linear, write=True):  # an offloaded projection's new bias goes into accelerate's store
            weight = linear.weight
            linear.bias = nn.Parameter(torch.zeros(linear.out_features, device=weight.device, dtype=weight.dtype),
                                       requires_grad=weight.requires_grad)


def enable_output_biases(model: nn.Module) -> None:
    """Give every q/k/v/o/gate/up/down projection a (zero) bias and switch the config so it is saved.

    Families without such config switches keep the biases in memory only (warned once).
    """
    space = SearchSpace.from_model(model)
    spec = space.spec
    switches = BIAS_SWITCHES.get(space.model_type)
    for layer in decoder_layers(model):
        attn, mlp = getattr(layer, spec.attention), getattr(layer, spec.mlp)
        names = ((attn, spec.o), (mlp, spec.down))
        if switches:
            names += ((attn, spec.q), (attn, spec.k), (attn, spec.v), (mlp, spec.gate), (mlp, spec.up))
        for parent, name in names:
            _ensure_bias(getattr(parent, name))
    config = model.config.get_text_config()
    if switches:
        for key in switches:
            setattr(config, key, True)
    else:
        logger.warning("%s projections have no bias in the stock modeling code: the bias compensation is in memory "
                       "only and would be lost by save_pruned", space.model_type)


@torch.no_grad()
def add_output_bias(linear: nn.Linear, value: torch.Tensor) -> None:
    """``linear.bias += value`` (``[out]``), creating the bias if needed."""
    _ensure_bias(linear)
    linear.bias += value.to(linear.bias.device, linear.bias.dtype)


@torch.no_grad()
def output_input_means(model: nn.Module, space: SearchSpace,
                       batches: list[dict[str, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``E[x]`` of every layer's ``o_proj`` and ``down_proj`` input on the dense model, ``[(o, down)]`` per layer
    (under a process group: each rank runs its shard of ``batches`` and the sums are added over the ranks)."""
    spec = space.spec
    stats = [(InputStatistics(getattr(getattr(layer, spec.attention), spec.o)),
              InputStatistics(getattr(getattr(layer, spec.mlp), spec.down))) for layer in decoder_layers(model)]
    device = model_device(model)
    for pair in stats:
        for s in pair:
            s.__enter__()
    try:
        with eval_mode(model):
            for batch in distributed.shard(batches):
                model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
    finally:
        for pair in stats:
            for s in pair:
                s.__exit__(None, None, None)
    all_reduce([s for pair in stats for s in pair])
    return [(o.mean, down.mean) for o, down in stats]


def bias_outputs(model: nn.Module, space: SearchSpace, masks: UnitValues,
                 means: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[tuple[int, str], OutputWeights]:
    """FLAP's compensation of one 0/1 mask sample for :func:`~pg_pruning_plugin.core.subnetwork.subnetwork`:
    per layer the removed inputs' mean contribution ``W[:, removed] E[x_removed]`` as an output bias."""
    spec = space.spec
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        shape = space.layers[i]
        for kind, linear, mask, width, mean in (
                ("attn", getattr(getattr(layer, spec.attention), spec.o), masks.attn[space.attn_slice(i)],
                 shape.queries_per_group * shape.head_dim, means[i][0]),
                ("mlp", getattr(getattr(layer, spec.mlp), spec.down), masks.mlp[space.mlp_slice(i)], 1, means[i][1])):
            removed = (mask < 0.5).repeat_interleave(width).to(mean.device)
            if bool(removed.any()):
                w = linear.weight.detach().to(mean.device, torch.float64)
                out[(i, kind)] = OutputWeights(None, (w @ torch.where(removed, mean, 0.0)).to(linear.weight.dtype))
    return out
