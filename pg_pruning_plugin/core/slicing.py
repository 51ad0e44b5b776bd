"""Which weight rows and columns a unit owns, and slicing a projection down to the kept ones.

A KV group owns ``n_rep·d`` rows of ``q_proj`` (and of its bias), ``d`` rows of ``k_proj`` and
``v_proj`` (and biases) and the matching ``n_rep·d`` columns of ``o_proj``; an MLP channel owns a
row of ``gate_proj`` and ``up_proj`` (and biases) and a column of ``down_proj``. Output biases of
``o_proj``/``down_proj`` live on the hidden size and are never sliced. Removal
(:mod:`~pg_pruning_plugin.core.removal`), sub-network execution
(:mod:`~pg_pruning_plugin.core.subnetwork`) and checkpoint loading
(:mod:`~pg_pruning_plugin.core.checkpoint`) all read :data:`UNIT_AXES`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .architectures import LayerShape

__all__ = ["UNIT_AXES", "kept_indices", "slice_projection", "sliced_parameter"]

# role -> (which kept index, dimension): dimension 0 slices output rows (and the bias), 1 input columns.
# "query": the query-space channels of the kept KV groups; "kv": their key/value channels; "mlp": kept channels.
UNIT_AXES: dict[str, tuple[str, int]] = {
    "q": ("query", 0), "k": ("kv", 0), "v": ("kv", 0), "o": ("query", 1),
    "gate": ("mlp", 0), "up": ("mlp", 0), "down": ("mlp", 1),
}


def kept_indices(shape: LayerShape, groups: torch.Tensor | None = None,
                 channels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The channel indices behind kept KV ``groups`` (``"query"``, ``"kv"``) and kept MLP ``channels``
    (``"mlp"``) of one layer, on the device of the given indices; absent inputs give absent entries."""
    out = {}
    if groups is not None:
        d, q_width = shape.head_dim, shape.queries_per_group * shape.head_dim
        out["query"] = (groups[:, None] * q_width + torch.arange(q_width, device=groups.device)).flatten()
        out["kv"] = (groups[:, None] * d + torch.arange(d, device=groups.device)).flatten()
    if channels is not None:
        out["mlp"] = channels
    return out


def sliced_parameter(parameter: torch.Tensor, index: torch.Tensor, dim: int,
                     requires_grad: bool | None = None) -> nn.Parameter:
    """A new Parameter holding ``parameter.index_select(dim, index)`` (``requires_grad`` defaults to the original's)."""
    keep_grad = parameter.requires_grad if requires_grad is None else requires_grad
    return nn.Parameter(parameter.detach().index_select(dim, index.to(parameter.device)), requires_grad=keep_grad)


def slice_projection(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep only the rows (``dim=0``, bias included) or columns (``dim=1``) ``index`` of ``linear``, in place."""
    linear.weight = sliced_parameter(linear.weight, index, dim)
    if dim == 0 and linear.bias is not None:
        linear.bias = sliced_parameter(linear.bias, index, 0)
    linear.out_features, linear.in_features = linear.weight.shape
