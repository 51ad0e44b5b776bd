"""Kept widths that every group quantization of a recipe divides: the single source of the rounding rules.

A group-quantization scheme with group size G on a projection needs the projection's input width
divisible by G. Pruning changes two input widths: ``o_proj``'s (``n_rep·head_dim`` columns per kept
KV group) and ``down_proj``'s (the kept MLP channels). So:

* ``down_proj`` group sizes G: kept MLP widths become multiples of lcm(G, ``round_to``);
* ``o_proj`` group sizes G: kept KV groups per layer become a multiple of G / gcd(G, n_rep·head_dim);
* q/k/v/gate/up read the hidden size, which pruning never changes: G must divide it, or no rounding helps.

Counts go to the nearest multiple with :func:`~pg_pruning_plugin.core.selection.nearest_multiple`,
capped at the largest multiple within the layer's width.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from compressed_tensors.quantization import QuantizationStrategy
from compressed_tensors.utils import match_named_modules
from llmcompressor.core import active_session
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.quantization.quantization.mixin import QuantizationMixin
from loguru import logger

from ...core.architectures import SearchSpace, projections
from ...core.selection import nearest_multiple
from ...core.units import UnitValues
from ...search.config import SearchResult

__all__ = ["later_group_sizes", "quantizable_masks", "width_multiples"]


_GROUPED = (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP)


def later_group_sizes(modifier: Modifier, model: nn.Module) -> dict[str, tuple[nn.Module, int]]:
    """``{module name: (Linear, group size)}`` that a group-quantization scheme of a modifier *after*
    ``modifier`` in the active recipe targets (the recipe is complete during initialize)."""
    modifiers = list(active_session().lifecycle.recipe.modifiers)
    index = next((i for i, m in enumerate(modifiers) if m is modifier), None)
    found: dict[str, tuple[nn.Module, int]] = {}
    for later in [] if index is None else modifiers[index + 1:]:  # None: initialised outside a recipe
        if not isinstance(later, QuantizationMixin):
            continue
        for scheme in later.resolved_config.config_groups.values():
            weights = scheme.weights
            if weights is None or weights.strategy not in _GROUPED or not weights.group_size:
                continue
            for name, module in match_named_modules(model, scheme.targets, later.ignore):
                if isinstance(module, nn.Linear):
                    previous = found.get(name, (module, 1))[1]
                    found[name] = (module, math.lcm(previous, int(weights.group_size)))
    return found


def width_multiples(group_sizes: dict[str, tuple[nn.Module, int]], model: nn.Module, space: SearchSpace,
                    round_to: int | None) -> tuple[int, int]:
    """(KV groups per layer multiple, MLP channel multiple) for ``group_sizes`` (see module docstring).

    Raises ``ValueError`` before the search when a group size can never divide a width that pruning
    produces (or the hidden size, which pruning never changes).
    """
    roles = {id(p.linear): p.role for p in projections(model)}
    attn_g, mlp_g, fixed = 1, 1, []
    for name, (module, g) in group_sizes.items():
        role = roles.get(id(module))
        if role == "o":
            attn_g = math.lcm(attn_g, g)
        elif role == "down":
            mlp_g = math.lcm(mlp_g, g)
        elif role is not None:  # q/k/v/gate/up read the hidden size, which pruning never changes
            fixed.append((name, g))
    bad = [(n, g) for n, g in fixed if space.hidden_size >= g and space.hidden_size % g]
    if bad:
        raise ValueError(
            f"the recipe quantizes {len(bad)} projections (e.g. {bad[0][0]}) with group size {bad[0][1]}, which "
            f"does not divide the hidden size {space.hidden_size}; their input width is never pruned, so no "
            f"rounding can fix it. Use config_groups with a group_size dividing {space.hidden_size} "
            f"(e.g. {math.gcd(space.hidden_size, 128)}) or put these modules in the quantization `ignore` list"
        )
    mlp_multiple = math.lcm(round_to or 1, mlp_g)
    attn_multiple = 1
    for i, shape in enumerate(space.layers):
        width = shape.queries_per_group * shape.head_dim  # o_proj columns per KV group
        attn_multiple = math.lcm(attn_multiple, attn_g // math.gcd(attn_g, width))
        if shape.num_kv_groups < attn_multiple:
            raise ValueError(
                f"group size {attn_g} cannot divide any o_proj width of layer {i}: a KV group has {width} "
                f"columns and the layer only {shape.num_kv_groups} groups; use a group size dividing {width}"
            )
        if shape.intermediate_size < mlp_multiple:
            raise ValueError(
                f"kept MLP widths must be multiples of {mlp_multiple} (round_to and group sizes), but layer {i} "
                f"has only {shape.intermediate_size} channels; use a smaller group size or round_to"
            )
    if group_sizes:
        logger.info("group quantization later in the recipe ({}): kept MLP widths rounded to multiples of {}, "
                    "kept KV groups per layer to multiples of {}", sorted({g for _, g in group_sizes.values()}),
                    mlp_multiple, attn_multiple)
    return attn_multiple, mlp_multiple


def quantizable_masks(result: SearchResult, attn_multiple: int, mlp_multiple: int) -> UnitValues:
    """``result.masks`` with every layer's kept count rounded to a multiple (KV groups / MLP channels).

    Each count goes to the nearest multiple that is at least one multiple and at most the layer width:
    the most probable dropped units are added, or the least probable kept units removed. Block masks
    (depth granularity) are kept as they are, and the widths of removed blocks are not rounded.
    """
    space, probs, masks = result.space, result.probs, result.masks
    attn_kept = masks.attn_blocks.bool().tolist() if masks.has_blocks else None
    mlp_kept = masks.mlp_blocks.bool().tolist() if masks.has_blocks else None
    return UnitValues(_round_kept(masks.attn, probs.attn, space.attn_offsets, attn_multiple, attn_kept),
                      _round_kept(masks.mlp, probs.mlp, space.mlp_offsets, mlp_multiple, mlp_kept),
                      None if masks.attn_blocks is None else masks.attn_blocks.clone(),
                      None if masks.mlp_blocks is None else masks.mlp_blocks.clone())


def _round_kept(mask: torch.Tensor, probs: torch.Tensor, offsets: list[int], multiple: int,
                blocks_kept: list[bool] | None = None) -> torch.Tensor:
    mask = mask.clone()
    for layer, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        if blocks_kept is not None and not blocks_kept[layer]:
            continue  # the whole block goes: its width is never built
        target = nearest_multiple(int(mask[a:b].sum()), multiple, (b - a) // multiple * multiple)
        order = torch.argsort(probs[a:b] + 2 * mask[a:b], descending=True)  # kept units first, by probability
        mask[a:b] = 0
        mask[a + order[:target]] = 1
    return mask
