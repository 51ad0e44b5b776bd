"""Physical removal of KV groups, MLP channels and whole blocks.

The weights are sliced directly (:mod:`~pg_pruning_plugin.core.slicing`): a removed KV group takes
its ``q_proj``, ``k_proj`` and ``v_proj`` rows (and biases) and its ``o_proj`` columns with it, a
removed MLP channel its ``gate_proj`` and ``up_proj`` rows (and biases) and its ``down_proj``
column. These are exactly the members Torch-Pruning's dependency graph couples for such a removal
(the Torch-Pruning plugin's tests check that on every supported family), so the result is what a
Torch-Pruning step produces, without tracing the model (docs/architecture.md says why).

Whole blocks (depth granularity): a removed attention block becomes :class:`RemovedAttention` and a
removed MLP block :class:`RemovedMLP`, modules without weights that add nothing to the residual
stream; a decoder layer that loses both is deleted and ``num_hidden_layers`` (and ``layer_types``)
shrink.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from .architectures import LayerShape, SearchSpace, architecture_of, decoder_layers
from .offload import onloaded
from .slicing import UNIT_AXES, kept_indices, slice_projection
from .units import UnitValues

__all__ = ["RemovedAttention", "RemovedMLP", "kept_space", "prune_model", "remove_blocks", "update_config"]

logger = logging.getLogger(__name__)


class RemovedAttention(nn.Module):
    """A removed attention block: its output is zero, so the decoder layer passes the residual stream on.

    It has no weights. With a KV cache it still appends one placeholder value per token to its cache
    layer (``[B, 1, T, 1]``), because transformers reads positions and mask sizes from cache layers.
    """

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, past_key_values=None, **kwargs) -> tuple[torch.Tensor, None]:
        if past_key_values is not None:
            marker = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            past_key_values.update(marker, marker, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class RemovedMLP(nn.Module):
    """A removed MLP block: no weights, zero output."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def kept_space(space: SearchSpace, masks: UnitValues) -> SearchSpace:
    """The widths ``masks`` keep in every layer of ``space`` (0 units where a block is removed)."""
    shapes = []
    for i, shape in enumerate(space.layers):
        kv = int(masks.attn[space.attn_slice(i)].sum())
        channels = int(masks.mlp[space.mlp_slice(i)].sum())
        if masks.has_blocks and not masks.attn_blocks[i]:
            kv = 0
        if masks.has_blocks and not masks.mlp_blocks[i]:
            channels = 0
        shapes.append(LayerShape(kv, shape.queries_per_group if kv else 0, shape.head_dim, channels))
    return space.with_layers(shapes)


def _kept(mask: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(mask > 0.5).flatten()


def prune_model(model: nn.Module, masks: UnitValues) -> nn.Module:
    """Remove every unit (and block) whose mask is 0, in place, and update the config; returns ``model``.

    The result computes the same logits as ``model`` under :func:`~pg_pruning_plugin.core.masking.masked`
    with ``masks``. Each projection is sliced on its own device; the sliced weights of a projection that
    accelerate offloads are written back to its offload store (core/offload.py), so the dispatched model
    runs and saves at its new widths.
    """
    space = SearchSpace.from_model(model)
    if masks.attn.numel() != space.num_attn_units or masks.mlp.numel() != space.num_mlp_units:
        raise ValueError(
            f"masks cover {masks.attn.numel()} KV groups and {masks.mlp.numel()} MLP channels; the model has "
            f"{space.num_attn_units} and {space.num_mlp_units}"
        )
    if space.has_removed_blocks:
        raise ValueError("the model already has removed blocks; apply masks to the unpruned model")
    after = kept_space(space, masks)
    drop_attn = [s.num_kv_groups == 0 for s in after.layers]
    drop_mlp = [s.intermediate_size == 0 for s in after.layers]
    if not masks.has_blocks:
        for i in range(space.num_layers):
            if drop_attn[i] or drop_mlp[i]:
                raise ValueError(f"masks remove every unit of layer {i}; at least one KV group and channel must stay "
                                 f"(or remove the whole block with attn_blocks/mlp_blocks masks)")
    if all(drop_attn) and all(drop_mlp):
        raise ValueError("masks remove every decoder layer; at least one block must stay")
    spec = space.spec
    for i, layer in enumerate(decoder_layers(model)):
        shape, kept = space.layers[i], after.layers[i]
        groups = _kept(masks.attn[space.attn_slice(i)])
        channels = _kept(masks.mlp[space.mlp_slice(i)])
        index = kept_indices(shape, groups if 0 < kept.num_kv_groups < shape.num_kv_groups else None,
                             channels if 0 < kept.intermediate_size < shape.intermediate_size else None)
        for role, (kind, dim) in UNIT_AXES.items():
            if kind in index:
                linear = getattr(getattr(layer, spec.block_of(role)), getattr(spec, role))
                with onloaded(linear, write=True):  # an offloaded projection is sliced where accelerate keeps it
                    slice_projection(linear, index[kind], dim)
    if any(drop_attn) or any(drop_mlp):
        remove_blocks(model, drop_attn, drop_mlp)
    update_config(model)
    return model


def remove_blocks(model: nn.Module, drop_attn: list[bool], drop_mlp: list[bool]) -> None:
    """Replace dropped blocks by weightless stand-ins, delete layers that lose both, renumber the rest."""
    spec = architecture_of(model)
    base = getattr(model, "model", model)
    config = model.config.get_text_config()
    kept_layers = []
    for i, layer in enumerate(decoder_layers(model)):
        if drop_attn[i] and drop_mlp[i]:
            continue
        if drop_attn[i]:
            setattr(layer, spec.attention, RemovedAttention(i))
        if drop_mlp[i]:
            setattr(layer, spec.mlp, RemovedMLP())
        kept_layers.append((i, layer))
    if len(kept_layers) < len(drop_attn):
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            config.layer_types = [layer_types[i] for i, _ in kept_layers]
        base.layers = nn.ModuleList(layer for _, layer in kept_layers)
        config.num_hidden_layers = len(kept_layers)
        for j, (_, layer) in enumerate(kept_layers):
            getattr(layer, spec.attention).layer_idx = j
            if hasattr(layer, "layer_idx"):
                layer.layer_idx = j


def update_config(model: nn.Module) -> None:
    """Write the current per-layer widths into the model and its config.

    ``pruned_layers`` records every layer's widths (0 heads or 0 channels: the block is removed) and is the
    truth :func:`~pg_pruning_plugin.core.checkpoint.load_pruned` builds from. The standard fields
    (``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``) hold the widest layer's widths:
    every layer's when they are uniform, so stock ``from_pretrained`` loads the checkpoint, and otherwise a
    width some layer really has rather than the unpruned one (stock loaders then refuse the narrower layers'
    weights; docs/serving.md). If the config class rejects those head counts (e.g. Llama requires
    ``hidden_size % num_attention_heads == 0``) the head fields stay as they were, with a warning.
    """
    space = SearchSpace.from_model(model)
    config = model.config.get_text_config()
    widths = [
        {"num_attention_heads": s.num_attention_heads, "num_key_value_heads": s.num_kv_groups,
         "intermediate_size": s.intermediate_size}
        for s in space.layers
    ]
    for layer, shape in zip(decoder_layers(model), space.layers):
        if shape.num_kv_groups:
            getattr(layer, space.spec.attention).num_key_value_groups = shape.queries_per_group
        if shape.intermediate_size:
            getattr(layer, space.spec.mlp).intermediate_size = shape.intermediate_size
    config.head_dim = space.layers[0].head_dim
    config.pruned_layers = widths
    widest = {key: max(w[key] for w in widths) for key in widths[0]}
    heads = {key: getattr(config, key) for key in ("num_attention_heads", "num_key_value_heads")}
    for key, value in widest.items():
        setattr(config, key, value)
    try:
        config.validate()
    except Exception as exc:  # noqa: BLE001 - transformers raises several validation error types
        logger.warning("%d query heads are not a valid %s (%s); keeping the original head counts, load the "
                       "checkpoint with pg_pruning_plugin.load_pruned", widest["num_attention_heads"],
                       type(config).__name__, exc)
        for key, value in heads.items():
            setattr(config, key, value)
