"""Physical removal of KV groups and MLP channels through Torch-Pruning's DependencyGraph.

For each layer the graph gives the coupled group of a removal: ``o_proj`` input columns of a KV
group pull in its ``q_proj`` rows and, through the GQA mapping of ``repeat_kv``, its ``k_proj`` and
``v_proj`` rows; ``gate_proj`` rows pull in ``up_proj`` rows and ``down_proj`` columns. The known
Torch-Pruning 1.6.1 pitfalls on transformers 5 are avoided here, without patching the library:
tracing uses eager attention and ``use_cache=False`` (bugs 1, 2); duplicated GQA indices are
removed before pruning and groups are never checked with the duplicate-counting check (bug 3);
index mappings are frozen at their traced values (bugs 10, 11: :func:`freeze_index_mappings`); each group
must contain exactly the expected Linear members, or removal stops with an error.

Whole blocks (depth granularity) are removed by the plugin itself: a removed attention block
becomes :class:`RemovedAttention` and a removed MLP block :class:`RemovedMLP`, modules without
weights that add nothing to the residual stream; a decoder layer that loses both is deleted and
``num_hidden_layers`` (and ``layer_types``) shrink.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning import ops
from torch_pruning.dependency.constants import INDEX_MAPPING_PLACEHOLDER

from .architectures import LayerShape, SearchSpace, architecture_of, decoder_layers
from ..scoring.metrics import UnitScores

__all__ = ["GroupLayoutError", "RemovedAttention", "RemovedMLP", "dependency_graph", "freeze_index_mappings",
           "kept_space", "prune_model", "remove_blocks", "update_config"]

logger = logging.getLogger(__name__)


class GroupLayoutError(RuntimeError):
    """Torch-Pruning coupled a removal with modules other than the expected projections."""


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


def kept_space(space: SearchSpace, masks: UnitScores) -> SearchSpace:
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
    return SearchSpace(space.spec, shapes, space.hidden_size, space.model_type)


@contextmanager
def tracing_mode(model: nn.Module) -> Iterator[None]:
    """Eager attention and no KV cache while Torch-Pruning traces; restored afterwards."""
    config = model.config
    attn_impl, use_cache = config._attn_implementation, getattr(config, "use_cache", None)
    model.set_attn_implementation("eager")
    config.use_cache = False
    try:
        yield
    finally:
        model.set_attn_implementation(attn_impl)
        config.use_cache = use_cache


def freeze_index_mappings(graph: tp.DependencyGraph) -> None:
    """Fix ``graph``'s index mappings at their traced values, with identity for concatenations.

    Torch-Pruning 1.6.1 recomputes mappings before every group from the *current* layer widths:
    * the GQA mapping of ``repeat_kv``'s expand takes ``n_rep`` = current query width / traced KV
      width, which is wrong once a KV group is gone (bug 11: a second pruning step on the same
      graph couples q to k/v 1:1);
    * RoPE's ``rotate_half`` (``cat(..., dim=-1)`` over head_dim; autograd saves ``dim=-1`` as
      2**64-1) is taken for a channel concat, and when the inferred sizes match (``n_rep == 2``)
      its offsets make ``get_pruning_group`` loop forever (bug 10). Whole heads map onto
      themselves through ``rotate_half``, so identity is the right mapping.
    Removing whole KV groups and MLP channels never changes ``n_rep`` or ``head_dim``, so the
    mappings traced on the unpruned model stay valid. Call it before anything is pruned.
    """
    for node in graph.module2node.values():
        node.enable_index_mapping = False  # update_index_mapping skips disabled nodes
        if node.type == ops.OPTYPE.CONCAT:
            incoming = [dep for src in node.inputs for dep in src.dependencies if dep.target is node]
            for dep in list(node.dependencies) + incoming:
                dep.index_mapping[1] = INDEX_MAPPING_PLACEHOLDER


def dependency_graph(model: nn.Module, example_input_ids: torch.Tensor | None = None) -> tp.DependencyGraph:
    """Trace ``model`` into a Torch-Pruning graph with the settings that work on transformers 5."""
    if example_input_ids is None:
        example_input_ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, 8))
    device = next(model.parameters()).device
    with tracing_mode(model), torch.enable_grad(), warnings.catch_warnings():
        # norm weights are reported as "unwrapped"; the hidden size is never pruned, so they are never touched
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        graph = tp.DependencyGraph().build_dependency(
            model,
            example_inputs={"input_ids": example_input_ids.to(device), "use_cache": False},
            output_transform=lambda out: out.logits,
        )
    freeze_index_mappings(graph)
    return graph


def _execute(group, expected: dict[nn.Module, str]) -> None:
    """Prune ``group`` with de-duplicated indices after checking it touches exactly ``expected``."""
    touched = {}
    for dep, idxs in group:
        module = dep.target.module
        if isinstance(module, nn.Linear) or module in expected:
            fn = dep.handler.__name__
            touched[module] = fn
            if expected.get(module) != fn:
                raise GroupLayoutError(
                    f"Torch-Pruning coupled {dep.target.name} ({fn}) with this removal, which the plugin does not "
                    f"expect; the group was:\n{group.details()}"
                )
    missing = [m for m in expected if m not in touched]
    if missing:
        raise GroupLayoutError(f"removal group lacks {len(missing)} expected projections:\n{group.details()}")
    for dep, idxs in group:
        module = dep.target.module
        if module in expected:
            dep(sorted(set(int(i) for i in idxs)))


def prune_model(model: nn.Module, masks: UnitScores, graph: tp.DependencyGraph | None = None) -> nn.Module:
    """Remove every unit (and block) whose mask is 0, in place, and update the config; returns ``model``.

    The result computes the same logits as ``model`` under :func:`masking.masked` with ``masks``.
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
    graph = graph or dependency_graph(model)
    spec = space.spec
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        shape = space.layers[i]
        attn, mlp = getattr(layer, spec.attention), getattr(layer, spec.mlp)
        q, k, v, o = (getattr(attn, n) for n in (spec.q, spec.k, spec.v, spec.o))
        gate, up, down = (getattr(mlp, n) for n in (spec.gate, spec.up, spec.down))
        removed_groups = (masks.attn[space.attn_slice(i)] == 0).nonzero().flatten().tolist()
        if removed_groups and not drop_attn[i]:
            width = shape.queries_per_group * shape.head_dim
            q_idxs = [g * width + j for g in removed_groups for j in range(width)]
            group = graph.get_pruning_group(o, tp.prune_linear_in_channels, q_idxs)
            _execute(group, {o: "prune_in_channels", q: "prune_out_channels",
                             k: "prune_out_channels", v: "prune_out_channels"})
        removed_channels = (masks.mlp[space.mlp_slice(i)] == 0).nonzero().flatten().tolist()
        if removed_channels and not drop_mlp[i]:
            group = graph.get_pruning_group(gate, tp.prune_linear_out_channels, removed_channels)
            _execute(group, {gate: "prune_out_channels", up: "prune_out_channels", down: "prune_in_channels"})
    for module in model.modules():
        if isinstance(module, nn.Linear):  # Torch-Pruning counts duplicated indices (bug 3b)
            module.out_features, module.in_features = module.weight.shape
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

    Always records ``pruned_layers`` (one dict per layer; 0 heads or 0 channels: the block is removed);
    when every layer is equal and the config class accepts them, the standard fields (``num_attention_heads``, ``num_key_value_heads``,
    ``intermediate_size``) are set too, so stock ``from_pretrained`` loads the checkpoint.
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
    if all(w == widths[0] for w in widths) and not space.has_removed_blocks:
        previous = {key: getattr(config, key) for key in widths[0]}
        for key, value in widths[0].items():
            setattr(config, key, value)
        try:
            config.validate()  # e.g. Llama requires hidden_size % num_attention_heads == 0
        except Exception as exc:  # noqa: BLE001 - transformers raises several validation error types
            logger.warning("uniform widths %s are not a valid %s (%s); keeping the original fields, load the "
                           "checkpoint with pg_pruning_plugin.load_pruned", widths[0], type(config).__name__, exc)
            for key, value in previous.items():
                setattr(config, key, value)
