"""Sub-network execution: the units a mask sample drops are skipped, not multiplied by zero.

Inside ``with subnetwork(model, space, masks)`` (one mask sample) every decoder layer runs on
``index_select``-ed copies of its kept weights: the q/k/v rows (and biases) and o_proj columns of
the kept KV groups, the gate/up rows (and biases) and down_proj columns of the kept MLP channels.
Whole KV groups go, so each layer's ``num_key_value_groups`` (query heads per KV head) is
unchanged and the attention reshapes with ``-1`` heads adapt to the narrower projections.

* The copies are made by a forward pre-hook of each layer and dropped by its forward hook, so at
  most one layer's kept weights exist twice; a layer keeping every unit is not touched at all.
* A block keeping no unit (possible under Bernoulli sampling) returns its output projection's
  bias, or exactly zero without one, as the masked-multiply path does.
* The original parameters, hooks and ``forward`` attributes are restored when the context exits,
  also on error: afterwards the model is exactly as before.
* Under an accelerate dispatch the kept indices live on each layer's execution device, and an
  offloaded projection is loaded by its own accelerate hook (core/offload.py) for the duration of its
  layer's forward, then sliced.

The losses equal those of :func:`pg_pruning_plugin.core.masking.masked` up to float rounding
(fewer terms in each sum), at the cost of the kept fraction of the prunable matmuls.

``outputs`` replaces the kept columns of a layer's output projection by other weights (and adds an
output bias) for the duration of the forward: the refitted weights of a candidate width
(search/levels.py), so a candidate is scored as the model it would be after the refit.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import NamedTuple

import torch
import torch.nn as nn

from .architectures import SearchSpace, decoder_layers
from .offload import execution_device, onloaded
from .slicing import UNIT_AXES, kept_indices, sliced_parameter
from .units import UnitMasks, UnitValues

__all__ = ["OutputWeights", "subnetwork"]


class OutputWeights(NamedTuple):
    """Replacement for one output projection (``o_proj`` of the kept KV groups, or ``down_proj`` of the kept
    channels) inside :func:`subnetwork`: ``weight`` ``[hidden, kept columns]`` in increasing column order
    (``None``: the sliced original) and ``bias`` ``[hidden]`` added to the projection's output (or ``None``)."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None

# (module, parameter name, original Parameter) of every weight currently swapped out.
_Swapped = list[tuple[nn.Module, str, nn.Parameter]]


def _swap(swapped: _Swapped, linear: nn.Linear, index: torch.Tensor, dim: int,
          replacement: OutputWeights | None = None) -> None:
    """Replace ``linear``'s weight (and, for rows, its bias) by the selected rows or columns, or, for the
    columns of an output projection, by ``replacement``."""
    names = ("weight", "bias") if dim == 0 else ("weight",)
    for name in names:
        original = linear._parameters.get(name)
        if original is None:
            continue
        swapped.append((linear, name, original))
        if replacement is not None and replacement.weight is not None:
            linear._parameters[name] = nn.Parameter(replacement.weight, requires_grad=False)
        else:
            linear._parameters[name] = sliced_parameter(original, index, dim, requires_grad=False)
    if replacement is not None and replacement.bias is not None:
        original = linear._parameters.get("bias")
        swapped.append((linear, "bias", original))
        added = replacement.bias if original is None else original.detach() + replacement.bias
        linear._parameters["bias"] = nn.Parameter(added, requires_grad=False)


def _restore(swapped: _Swapped) -> None:
    while swapped:
        module, name, original = swapped.pop()
        module._parameters[name] = original


def _constant_forward(projection: nn.Linear, returns_tuple: bool):
    """``forward`` replacement for a block with no kept unit: the projection's bias, or zeros."""

    def forward(*args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        out = hidden.new_zeros(*hidden.shape[:-1], projection.out_features)
        if projection.bias is not None:
            with onloaded(projection):
                out = out + projection.bias.to(out.device)
        return (out, None) if returns_tuple else out

    return forward


def _kept(mask: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(mask > 0.5).flatten()


@contextmanager
def subnetwork(model: nn.Module, space: SearchSpace, masks: UnitMasks | UnitValues,
               outputs: Mapping[tuple[int, str], OutputWeights] | None = None) -> Iterator[nn.Module]:
    """Run ``model`` as the sub-network that ``masks`` (exactly one 0/1 sample) keeps; ``outputs[(layer,
    "attn" | "mlp")]`` replaces that layer's kept output-projection columns (module docstring)."""
    masks = UnitMasks.of(masks).folded(space)
    if masks.num_samples != 1:
        raise ValueError(f"subnetwork runs one mask sample per forward, got {masks.num_samples}")
    for name, m in (("attn", masks.attn), ("mlp", masks.mlp)):
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError(f"subnetwork needs 0/1 masks; the {name} mask has other values")
        expected = space.num_attn_units if name == "attn" else space.num_mlp_units
        if m.shape[1] != expected:
            raise ValueError(f"{name} mask has {m.shape[1]} units, the model has {expected}")
    spec = space.spec
    swapped: _Swapped = []
    handles = []
    overridden: list[tuple[nn.Module, object]] = []  # (module, its own forward attribute or None)

    def override(module: nn.Module, projection: nn.Linear, returns_tuple: bool) -> None:
        overridden.append((module, module.__dict__.get("forward")))
        module.forward = _constant_forward(projection, returns_tuple)

    onloads = ExitStack()  # offloaded projections whose weights are on their device while their layer runs

    def swap_in(blocks: dict[str, nn.Module], index: dict[str, torch.Tensor], layer: int):
        def hook(module, args):
            for role, (kind, dim) in UNIT_AXES.items():
                if kind in index:
                    unit = "mlp" if kind == "mlp" else "attn"
                    replacement = outputs.get((layer, unit)) if outputs and dim == 1 else None
                    linear = getattr(blocks[spec.block_of(role)], getattr(spec, role))
                    onloads.enter_context(onloaded(linear))
                    _swap(swapped, linear, index[kind], dim, replacement)

        return hook

    def swap_out(module, args, output):
        _restore(swapped)
        onloads.close()

    try:
        for i, layer in enumerate(decoder_layers(model)):
            shape = space.layers[i]
            attn = getattr(layer, spec.attention)
            mlp = getattr(layer, spec.mlp)
            device = execution_device(getattr(attn, spec.q))
            groups = _kept(masks.attn[0, space.attn_slice(i)]).to(device)
            channels = _kept(masks.mlp[0, space.mlp_slice(i)]).to(device)
            kept_groups = kept_channels = None
            if groups.numel() == 0:
                override(attn, getattr(attn, spec.o), returns_tuple=True)
            elif groups.numel() < shape.num_kv_groups:
                kept_groups = groups
            if channels.numel() == 0:
                override(mlp, getattr(mlp, spec.down), returns_tuple=False)
            elif channels.numel() < shape.intermediate_size:
                kept_channels = channels
            index = kept_indices(shape, kept_groups, kept_channels)
            if index:
                blocks = {spec.attention: attn, spec.mlp: mlp}
                handles.append(layer.register_forward_pre_hook(swap_in(blocks, index, i)))
                handles.append(layer.register_forward_hook(swap_out))
        yield model
    finally:
        for h in handles:
            h.remove()
        _restore(swapped)
        onloads.close()
        for module, own_forward in reversed(overridden):
            if own_forward is None:
                del module.forward
            else:
                module.forward = own_forward
