"""Output biases for the ``bias`` refit (FLAP's compensation): where they live and how they are saved.

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

from ..core.architectures import SearchSpace, decoder_layers

__all__ = ["BIAS_SWITCHES", "add_output_bias", "enable_output_biases"]

logger = logging.getLogger(__name__)

# Config switches that give o_proj/down_proj a bias in the stock modeling code (all projections then have one).
BIAS_SWITCHES = {"llama": ("attention_bias", "mlp_bias")}


def _ensure_bias(linear: nn.Linear) -> None:
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, device=linear.weight.device,
                                               dtype=linear.weight.dtype), requires_grad=linear.weight.requires_grad)


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
