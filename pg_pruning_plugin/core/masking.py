"""Masked forward passes: unit masks act on activations, weights are never touched.

A mask zeroes a KV group's slice of the ``o_proj`` input and an MLP channel's entry of the
``down_proj`` input (method.md §2.2), so a masked model computes exactly what the physically
pruned model computes. Hooks are removed when the context exits, also on error.

Blocks whose mask keeps every unit get no hook, so an all-ones mask costs nothing.
Several mask samples can share one forward: with ``S`` samples the batch is sample-major,
``[S·B, T]``, and row block ``s`` sees sample ``s``'s mask.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from .architectures import SearchSpace, decoder_layers

__all__ = ["UnitMasks", "masked"]


@dataclass
class UnitMasks:
    """Keep masks over the flat unit vectors of a :class:`SearchSpace`.

    attn: ``[S, num_attn_units]``, mlp: ``[S, num_mlp_units]``; 1 keeps, 0 removes.
    A 1-D tensor is one sample.
    """

    attn: torch.Tensor
    mlp: torch.Tensor
    attn_blocks: torch.Tensor | None = None  # [S, num_layers]: 0 removes a layer's whole attention block
    mlp_blocks: torch.Tensor | None = None  # [S, num_layers]: 0 removes a layer's whole MLP block

    def __post_init__(self) -> None:
        for name in ("attn", "mlp", "attn_blocks", "mlp_blocks"):
            value = getattr(self, name)
            if value is not None and value.dim() == 1:
                setattr(self, name, value.unsqueeze(0))
        if self.attn.shape[0] != self.mlp.shape[0]:
            raise ValueError("attn and mlp masks must have the same number of samples")
        if (self.attn_blocks is None) != (self.mlp_blocks is None):
            raise ValueError("give both attn_blocks and mlp_blocks, or neither")

    def folded(self, space: SearchSpace) -> UnitMasks:
        """Width-only masks: a removed block zeroes every unit of its layer, which makes it an
        identity on the residual stream (its output projection has no bias in any supported family)."""
        if self.attn_blocks is None:
            return self
        attn_per_unit = torch.repeat_interleave(
            self.attn_blocks, torch.tensor([s.num_kv_groups for s in space.layers]), dim=1)
        mlp_per_unit = torch.repeat_interleave(
            self.mlp_blocks, torch.tensor([s.intermediate_size for s in space.layers]), dim=1)
        return UnitMasks(self.attn * attn_per_unit, self.mlp * mlp_per_unit)

    @property
    def num_samples(self) -> int:
        return self.attn.shape[0]

    @classmethod
    def ones(cls, space: SearchSpace, num_samples: int = 1) -> UnitMasks:
        return cls(torch.ones(num_samples, space.num_attn_units), torch.ones(num_samples, space.num_mlp_units))


def _scale_input(mask: torch.Tensor):
    """Pre-hook multiplying the last dim of the input by ``mask`` ([S, C]), per sample block."""

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        shaped = x.reshape(mask.shape[0], -1, x.shape[-1]) * mask[:, None, :]  # [S, B·T, C]
        return (shaped.reshape(x.shape), *args[1:])

    return hook


@contextmanager
def masked(model: nn.Module, space: SearchSpace, masks: UnitMasks) -> Iterator[nn.Module]:
    """Apply ``masks`` to ``model`` inside the block; the model is unchanged afterwards."""
    spec = space.spec
    masks = masks.folded(space)
    handles = []
    try:
        for i, layer in enumerate(decoder_layers(model)):
            shape = space.layers[i]
            attn_mask = masks.attn[:, space.attn_slice(i)]  # [S, n_kv]
            attn_mask = attn_mask.repeat_interleave(shape.queries_per_group * shape.head_dim, dim=1)  # [S, n_q·d]
            mlp_mask = masks.mlp[:, space.mlp_slice(i)]  # [S, I]
            o_proj = getattr(getattr(layer, spec.attention), spec.o)
            down_proj = getattr(getattr(layer, spec.mlp), spec.down)
            weight = o_proj.weight
            for module, mask in ((o_proj, attn_mask), (down_proj, mlp_mask)):
                if not bool((mask == 1).all()):  # a block that keeps every unit runs exactly as the dense one
                    handles.append(module.register_forward_pre_hook(_scale_input(mask.to(weight.device, weight.dtype))))
        yield model
    finally:
        for h in handles:
            h.remove()
