"""Masked forward passes: unit masks act on activations, weights are never touched.

A mask zeroes a KV group's slice of the ``o_proj`` input and an MLP channel's entry of the
``down_proj`` input (method.md §2.2), so a masked model computes exactly what the physically
pruned model computes. Hooks are removed when the context exits, also on error. A mask moves to the
device each projection's input is on, so models dispatched by accelerate (offloaded layers too) work.

Blocks whose mask keeps every unit get no hook, so an all-ones mask costs nothing.
Several mask samples can share one forward: with ``S`` samples the batch is sample-major,
``[S·B, T]``, and row block ``s`` sees sample ``s``'s mask.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from .architectures import SearchSpace, decoder_layers
from .units import UnitMasks, UnitValues

__all__ = ["masked"]


def _scale_input(mask: torch.Tensor, dtype: torch.dtype):
    """Pre-hook multiplying the last dim of the input by ``mask`` ([S, C], as ``dtype``), per sample block; the
    mask goes to the device of the input (an accelerate dispatch decides where each layer runs)."""
    on_device: dict[torch.device, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        if x.device not in on_device:
            on_device[x.device] = mask.to(x.device, dtype)
        shaped = x.reshape(mask.shape[0], -1, x.shape[-1]) * on_device[x.device][:, None, :]  # [S, B·T, C]
        return (shaped.reshape(x.shape), *args[1:])

    return hook


@contextmanager
def masked(model: nn.Module, space: SearchSpace, masks: UnitMasks | UnitValues) -> Iterator[nn.Module]:
    """Apply ``masks`` (a :class:`UnitValues` is one sample) to ``model`` inside the block; the model is
    unchanged afterwards."""
    spec = space.spec
    masks = UnitMasks.of(masks).folded(space)
    handles = []
    try:
        for i, layer in enumerate(decoder_layers(model)):
            shape = space.layers[i]
            attn_mask = masks.attn[:, space.attn_slice(i)]  # [S, n_kv]
            attn_mask = attn_mask.repeat_interleave(shape.queries_per_group * shape.head_dim, dim=1)  # [S, n_q·d]
            mlp_mask = masks.mlp[:, space.mlp_slice(i)]  # [S, I]
            o_proj = getattr(getattr(layer, spec.attention), spec.o)
            down_proj = getattr(getattr(layer, spec.mlp), spec.down)
            dtype = o_proj.weight.dtype
            for module, mask in ((o_proj, attn_mask), (down_proj, mlp_mask)):
                if not bool((mask == 1).all()):  # a block that keeps every unit runs exactly as the dense one
                    handles.append(module.register_forward_pre_hook(_scale_input(mask, dtype)))
        yield model
    finally:
        for h in handles:
            h.remove()
