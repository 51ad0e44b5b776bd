"""Torch-Pruning plugin: learned keep-probabilities as a ``tp.importance.Importance``.

::

    import torch_pruning as tp
    from pg_pruning_plugin.integrations.torch_pruning import PolicyGradientImportance, build_pruner

    importance = PolicyGradientImportance(search_result, model)   # or a path written by SearchResult.save
    pruner = build_pruner(model, importance, attn_ratio=0.3, mlp_ratio=0.3)   # a tp.pruner.BasePruner
    pruner.step()                      # whole KV groups and MLP channels removed, config updated

The importance scores one *unit* per KV group (one KV head and its ``n_rep`` query heads) and per
MLP channel; Torch-Pruning asks for one score per root channel of a group, so a KV group's score
is repeated over its ``n_rep·head_dim`` query-space channels. Groups the importance does not own
(stand-alone k/v, the residual stream, embeddings, lm_head) get ``None``. Scores are the ranks of
the keep-probabilities (ties broken by unit id, lower ranks pruned first), keyed by the original
unit ids, so they stay valid while iterative pruning shifts channel indices.

Torch-Pruning 1.6.1 on transformers 5 needs workarounds (reference: torch_pruning.md), applied
only to objects this module creates or is handed, never to the library:

* tracing with eager attention and ``use_cache=False`` (bugs 1, 2), restored afterwards;
* the KV-group trick ``num_heads[q] = num_heads[k] = num_heads[v] = n_kv`` (bugs 4-7);
* RoPE concatenations get the identity index mapping (bug 10: ``n_rep == 2`` loops forever);
* a de-duplicating, *raising* ``check_pruning_group`` on the pruner's own graph (bugs 3a, 8):
  a step that would empty a layer is refused with the layer named instead of skipped silently;
* duplicated GQA indices removed before pruning and only the Linear members pruned (bug 3b;
  per-head q/k norm weights sit in the group with query-space indices and must stay untouched);
* +rank bonus on each layer's best units, so global ranking never selects a whole layer (bug 8).

Results of a depth or width+depth search (``SearchConfig(granularity=...)``) also remove whole
attention/MLP blocks. Torch-Pruning cannot remove a block, so the importance returns ``None`` for the
groups of those blocks (``removed_blocks`` lists them), :func:`build_pruner` and
:class:`PolicyGradientPruner` add them to ``ignored_layers`` (so they count in no ratio), and
:func:`prune_step` removes them with the core engine (``removal.remove_blocks``) after the width
pruning of the *last* iterative step. With a cost budget (``SearchConfig(cost=...)``) the default
ratios are those of the search's hard masks, so ``build_pruner(model, importance).step()``
reproduces ``result.masks``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

from ...core.architectures import SearchSpace, decoder_layers
from ...scoring.metrics import UnitScores
from ...core.removal import GroupLayoutError, freeze_index_mappings, remove_blocks, tracing_mode, update_config
from ...search.loop import SearchResult

__all__ = [
    "GroupLayoutError",
    "PolicyGradientImportance",
    "PolicyGradientPruner",
    "StepReport",
    "build_pruner",
    "kv_group_heads",
    "prune_step",
    "tracing_inputs",
    "tracing_mode",
]

logger = logging.getLogger(__name__)

_OUT, _IN = "prune_out_channels", "prune_in_channels"
_ATTN, _MLP = "attn", "mlp"


def _handler(dep) -> str:
    return getattr(dep.handler, "__name__", "")


def kv_group_heads(model: nn.Module) -> dict[nn.Module, int]:
    """``num_heads`` for Torch-Pruning with one "head" per KV group: ``{q, k, v: n_kv}`` per layer
    (layers whose attention block was removed have none)."""
    space = SearchSpace.from_model(model)
    heads: dict[nn.Module, int] = {}
    for layer, shape in zip(decoder_layers(model), space.layers):
        if shape.num_kv_groups == 0:
            continue
        attn = getattr(layer, space.spec.attention)
        for name in (space.spec.q, space.spec.k, space.spec.v):
            heads[getattr(attn, name)] = shape.num_kv_groups
    return heads


def tracing_inputs(model: nn.Module, inputs: torch.Tensor | dict | None = None) -> dict[str, Any]:
    """Tracing inputs as a dict with ``use_cache=False`` (a KV cache makes tracing hang, bug 1)."""
    if inputs is None:
        vocab = model.config.get_text_config().vocab_size
        inputs = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs}
    device = next(model.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()} | {"use_cache": False}


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """0..n-1 in ascending order of ``values``; ties broken by position (stable)."""
    order = torch.argsort(values.float(), stable=True)
    ranks = torch.empty(values.numel(), dtype=torch.float32)
    ranks[order] = torch.arange(values.numel(), dtype=torch.float32)
    return ranks


def _describe(shape) -> str:
    return (f"{shape.num_kv_groups} KV groups x {shape.queries_per_group} queries, head_dim {shape.head_dim}, "
            f"{shape.intermediate_size} MLP channels")


def _search_removed_blocks(result: SearchResult) -> tuple[tuple[int, str], ...]:
    """``(layer, "attn" | "mlp")`` of the blocks whose hard mask is 0, layer by layer, attention first."""
    masks = result.masks
    if not masks.has_blocks:
        return ()
    num_layers = result.space.num_layers
    for name, value in (("attn_blocks", masks.attn_blocks), ("mlp_blocks", masks.mlp_blocks)):
        if value.numel() != num_layers:
            raise ValueError(f"search result masks hold {value.numel()} {name} entries for {num_layers} layers")
    return tuple((i, kind) for i in range(num_layers)
                 for kind, value in ((_ATTN, masks.attn_blocks), (_MLP, masks.mlp_blocks)) if not value[i])


def _format_blocks(blocks: Sequence[tuple[int, str]]) -> str:
    return ", ".join(f"layer {i} {kind}" for i, kind in blocks) or "none"


class PolicyGradientImportance(tp.importance.Importance):
    """One score per root channel of attention and MLP groups, from a finished policy-gradient search.

    ``search``: a :class:`SearchResult` or a path written by :meth:`SearchResult.save`; it must
    describe ``model`` as it is now (same family and widths), or a ``ValueError`` says where they
    differ. ``min_keep_channels``: MLP channels of every layer that global ranking never selects
    (default: the search's ``round_to`` or 1; :func:`prune_step` raises it to the pruner's
    ``round_to``); the best KV group of every layer is always kept.

    Returns ``None`` for groups it does not own and for the groups of blocks the search removed
    (depth granularities: :attr:`removed_blocks`, deleted by :func:`prune_step` at the last step);
    raises :class:`GroupLayoutError` for a group of this model whose layout it does not recognise,
    and ``ValueError`` for a group of another model.
    """

    def __init__(self, search: SearchResult | str | os.PathLike, model: nn.Module,
                 min_keep_channels: int | None = None):
        result = search if isinstance(search, SearchResult) else SearchResult.load(search)
        space = SearchSpace.from_model(model)
        _check_same_model(result.space, space)
        if result.probs.attn.numel() != space.num_attn_units or result.probs.mlp.numel() != space.num_mlp_units:
            raise ValueError(
                f"search result holds {result.probs.attn.numel()} KV-group and {result.probs.mlp.numel()} channel "
                f"probabilities; the model has {space.num_attn_units} and {space.num_mlp_units} units"
            )
        self.result = result
        self.model = model
        self.space = space
        self.min_keep_channels = max(1, min_keep_channels or result.config.round_to or 1)
        self._ranks = {_ATTN: _ranks(result.probs.attn), _MLP: _ranks(result.probs.mlp)}
        self._slices = {_ATTN: space.attn_slice, _MLP: space.mlp_slice}
        # Original unit ids (within the layer) still present, in current channel order.
        self.alive: dict[str, list[list[int]]] = {
            _ATTN: [list(range(s.num_kv_groups)) for s in space.layers],
            _MLP: [list(range(s.intermediate_size)) for s in space.layers],
        }
        spec = space.spec
        self._roles: dict[nn.Module, tuple[int, str]] = {}
        self._modules: dict[tuple[int, str], nn.Module] = {}
        for i, layer in enumerate(decoder_layers(model)):
            attn, mlp = getattr(layer, spec.attention), getattr(layer, spec.mlp)
            for role, parent, name in (("q", attn, spec.q), ("k", attn, spec.k), ("v", attn, spec.v),
                                       ("o", attn, spec.o), ("gate", mlp, spec.gate), ("up", mlp, spec.up),
                                       ("down", mlp, spec.down)):
                module = getattr(parent, name)
                self._roles[module] = (i, role)
                self._modules[(i, role)] = module
        self._model_modules = set(model.modules())
        self._removed: tuple[tuple[int, str], ...] = _search_removed_blocks(result)
        self._blocks: dict[tuple[int, str], nn.Module] = {
            (i, kind): getattr(layer, spec.attention if kind == _ATTN else spec.mlp)
            for i, layer in enumerate(decoder_layers(model)) for kind in (_ATTN, _MLP)
        }
        self._deleted_layers: set[int] = set()  # decoder layers that lost both blocks, once removed
        self.blocks_pending = bool(self._removed)  # removed blocks still in the model
        if self._removed:
            logger.info("the search removed %d blocks (%s); the importance skips their groups and prune_step "
                        "removes them at the pruner's last step", len(self._removed), _format_blocks(self._removed))

    # -- removed blocks (depth granularities) -----------------------------------------------
    @property
    def removed_blocks(self) -> list[tuple[int, str]]:
        """``(layer, "attn" | "mlp")`` of every block the search removed, in original layer numbering."""
        return list(self._removed)

    def removed_block_modules(self) -> list[nn.Module]:
        """The attention/MLP modules of :attr:`removed_blocks` as they are in the model before removal:
        what a hand-built ``BasePruner`` needs in ``ignored_layers`` (``build_pruner`` adds them itself)."""
        return [self._blocks[key] for key in self._removed]

    def present_layers(self) -> list[int]:
        """Original indices of the decoder layers still in the model."""
        return [i for i in range(self.space.num_layers) if i not in self._deleted_layers]

    def mark_blocks_removed(self) -> None:
        """Record that :attr:`removed_blocks` left the model (their units are no longer alive)."""
        for layer, kind in self._removed:
            self.alive[kind][layer] = []
        self._deleted_layers = {i for i in range(self.space.num_layers)
                                if (i, _ATTN) in self._removed and (i, _MLP) in self._removed}
        self.blocks_pending = False

    # -- scores ----------------------------------------------------------------------------
    def unit_scores(self, kind: str, layer: int) -> torch.Tensor:
        """Scores of layer ``layer``'s original units (ranks; the protected best ones lifted above all)."""
        ranks = self._ranks[kind]
        scores = ranks[self._slices[kind](layer)].clone()
        keep = 1 if kind == _ATTN else min(self.min_keep_channels, scores.numel())
        scores[torch.topk(scores, keep).indices] += ranks.numel()
        return scores

    def __call__(self, group) -> torch.Tensor | None:
        kind, layer = self.classify(group)
        if kind is None or (layer, kind) in self._removed:
            return None  # not ours, or a block the search removed: the engine deletes it, not Torch-Pruning
        shape = self.space.layers[layer]
        alive = self.alive[kind][layer]
        scores = self.unit_scores(kind, layer)[alive]
        if kind == _ATTN:
            scores = scores.repeat_interleave(shape.queries_per_group * shape.head_dim)
        idxs = torch.as_tensor(list(group[0].idxs), dtype=torch.long)
        return scores[idxs]

    # -- group layouts ---------------------------------------------------------------------
    def classify(self, group) -> tuple[str | None, int | None]:
        """``("attn" | "mlp", layer)`` for groups this importance scores, ``(None, None)`` otherwise."""
        root, fn = group[0].dep.target.module, _handler(group[0].dep)
        if root not in self._model_modules:
            raise ValueError(
                f"group rooted at {group[0].dep.target.name} is not part of the model this importance was built "
                f"for; build a PolicyGradientImportance for each model"
            )
        if root not in self._roles:
            return None, None  # embeddings, lm_head, norms
        layer, role = self._roles[root]
        linears = {dep.target.module for dep, _ in group if isinstance(dep.target.module, nn.Linear)}
        if (role, fn) in (("o", _IN), ("q", _OUT)):
            kind = _ATTN
        elif (role, fn) in (("gate", _OUT), ("up", _OUT), ("down", _IN)):
            kind = _MLP
        elif role in ("k", "v") and fn == _OUT:
            if linears == {root}:
                return None, None  # stand-alone k/v group: k/v without their queries must never be pruned
            kind = _ATTN  # plain multi-head attention: q/k/v/o coupled 1:1, rooted in key space
        else:
            return None, None  # the residual stream (hidden size), never pruned here
        self._check_members(group, kind, layer)
        return kind, layer

    def _expected(self, group, kind: str, layer: int, root_role: str) -> dict[nn.Module, tuple]:
        """Linear members of a group and the channel set each must lose, from the root indices."""
        root_idxs = set(int(i) for i in group[0].idxs)
        m = {role: self._modules[(layer, role)] for role in ("q", "k", "v", "o", "gate", "up", "down")}
        if kind == _MLP:
            return {m["gate"]: (_OUT, root_idxs), m["up"]: (_OUT, root_idxs), m["down"]: (_IN, root_idxs)}
        shape = self.space.layers[layer]
        d, width = shape.head_dim, shape.queries_per_group * shape.head_dim
        if root_role in ("k", "v"):
            if shape.queries_per_group != 1:
                raise GroupLayoutError(
                    f"layer {layer}: {group[0].dep.target.name} is coupled 1:1 with the "
                    f"{shape.queries_per_group}x wider query space (SDPA tracing, torch_pruning.md bug 2); "
                    f"trace under tracing_mode(model)"
                )
            kv_idxs = root_idxs
        else:
            kv_idxs = {(c // width) * d + c % d for c in root_idxs}
        return {m["q"]: (_OUT, root_idxs), m["o"]: (_IN, root_idxs), m["k"]: (_OUT, kv_idxs), m["v"]: (_OUT, kv_idxs)}

    def _check_members(self, group, kind: str, layer: int) -> None:
        """Raise :class:`GroupLayoutError` unless the group couples exactly the expected channels."""
        root_role = self._roles[group[0].dep.target.module][1]
        expected = self._expected(group, kind, layer, root_role)
        head_dim = self.space.layers[layer].head_dim
        seen = set()
        for dep, idxs in group:
            module = dep.target.module
            if isinstance(module, nn.Parameter):
                if kind == _ATTN and module.dim() == 1 and module.numel() == head_dim:
                    continue  # per-head q/k norm weight: shared by all heads, untouched by whole-head removal
                problem = f"parameter of shape {tuple(module.shape)}"
            elif module in expected:
                fn, channels = expected[module]
                if _handler(dep) == fn and set(int(i) for i in idxs) == channels:
                    seen.add(module)
                    continue
                problem = f"{_handler(dep)} on {len(set(idxs))} channels (expected {fn} on {len(channels)})"
            elif isinstance(module, nn.Module) and not any(True for _ in module.parameters(recurse=False)):
                continue  # Torch-Pruning's parameter-free pseudo-ops (reshape, element-wise, ...)
            else:
                problem = "a module the plugin does not expect"
            raise GroupLayoutError(
                f"layer {layer} {kind} group rooted at {group[0].dep.target.name}: {dep.target.name} has {problem}. "
                f"Trace with tracing_mode(model) (eager attention, no cache) and num_heads=kv_group_heads(model)"
            )
        missing = [m for m in expected if m not in seen]
        if missing:
            raise GroupLayoutError(f"layer {layer} {kind} group rooted at {group[0].dep.target.name} lacks "
                                   f"{len(missing)} coupled projections; Torch-Pruning traced the model wrongly")

    # -- bookkeeping -----------------------------------------------------------------------
    def removed_positions(self, group, kind: str, layer: int) -> list[int]:
        """Current positions of the units a removal group deletes; refuses partial KV groups."""
        idxs = sorted(set(int(i) for i in group[0].idxs))
        if kind == _MLP:
            return idxs
        shape = self.space.layers[layer]
        width = shape.head_dim if self._roles[group[0].dep.target.module][1] in ("k", "v") else \
            shape.queries_per_group * shape.head_dim
        positions = sorted({c // width for c in idxs})
        if len(idxs) != len(positions) * width:
            raise GroupLayoutError(
                f"layer {layer}: removal of {len(idxs)} channels cuts into KV groups of {width} channels; "
                f"pass prune_head_dims=False and num_heads=kv_group_heads(model)"
            )
        return positions

    def mark_removed(self, kind: str, layer: int, positions: Sequence[int]) -> None:
        """Drop the units at current ``positions`` of a layer from the alive list."""
        gone = set(positions)
        self.alive[kind][layer] = [u for p, u in enumerate(self.alive[kind][layer]) if p not in gone]

    def check_widths(self) -> None:
        """Raise if the model's widths no longer match the alive lists (pruned behind our back)."""
        now = SearchSpace.from_model(self.model)
        present = self.present_layers()
        if len(now.layers) != len(present):
            raise ValueError(
                f"the model has {len(now.layers)} decoder layers, but this importance tracked {len(present)}: the "
                f"model was pruned outside prune_step; build a new importance for it"
            )
        for i, shape in zip(present, now.layers):
            if (shape.num_kv_groups, shape.intermediate_size) != (len(self.alive[_ATTN][i]), len(self.alive[_MLP][i])):
                raise ValueError(
                    f"layer {i} has {shape.num_kv_groups} KV groups and {shape.intermediate_size} channels, but this "
                    f"importance tracked {len(self.alive[_ATTN][i])} and {len(self.alive[_MLP][i])}: the model was "
                    f"pruned outside prune_step; build a new importance for it"
                )

    def kept_masks(self) -> UnitScores:
        """0/1 masks over the original units (1 = still present), in :class:`SearchSpace` order.

        For a depth-granularity result the block masks are included: 0 once :func:`prune_step` has
        removed the block (whose units are then 0 too), 1 before.
        """
        masks = []
        for kind, n in ((_ATTN, self.space.num_attn_units), (_MLP, self.space.num_mlp_units)):
            mask = torch.zeros(n)
            for layer, alive in enumerate(self.alive[kind]):
                mask[self._slices[kind](layer).start + torch.tensor(alive, dtype=torch.long)] = 1.0
            masks.append(mask)
        if not self.result.masks.has_blocks:
            return UnitScores(*masks)
        gone = set() if self.blocks_pending else set(self._removed)
        blocks = [torch.tensor([0.0 if (i, kind) in gone else 1.0 for i in range(self.space.num_layers)])
                  for kind in (_ATTN, _MLP)]
        return UnitScores(*masks, *blocks)

    def projections(self, role: str) -> list[nn.Module]:
        """The ``role`` projection (``"q"``, ``"gate"``, ...) of every layer."""
        return [self._modules[(i, role)] for i in range(self.space.num_layers)]

    def layer_of(self, module: nn.Module) -> str:
        """``"layer i"`` for a projection of the model, else its class name (for error messages)."""
        role = self._roles.get(module)
        return f"layer {role[0]} ({role[1]}_proj)" if role else type(module).__name__


def _check_same_model(expected: SearchSpace, actual: SearchSpace) -> None:
    if (expected.model_type, expected.hidden_size) != (actual.model_type, actual.hidden_size):
        raise ValueError(
            f"the search result is for a {expected.model_type} model with hidden size {expected.hidden_size}; "
            f"this model is {actual.model_type} with hidden size {actual.hidden_size}"
        )
    if len(expected.layers) != len(actual.layers):
        raise ValueError(f"the search result covers {len(expected.layers)} layers; the model has {len(actual.layers)}")
    for i, (a, b) in enumerate(zip(expected.layers, actual.layers)):
        if a != b:
            raise ValueError(f"layer {i}: the search result expects {_describe(a)}; the model has {_describe(b)}")


# -- the pruning step ---------------------------------------------------------------------------
@dataclasses.dataclass
class StepReport:
    """What one :func:`prune_step` removed (current-model counts).

    ``kept_per_layer`` has one entry per *original* decoder layer (0 for a removed block, ``(0, 0)``
    for a deleted layer); the counts of removed units exclude those of removed blocks.
    """

    kv_groups_removed: int
    channels_removed: int
    kept_per_layer: list[tuple[int, int]]  # (KV groups, MLP channels)
    blocks_removed: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (layer, "attn" | "mlp")


def _refusing_check(graph: tp.DependencyGraph, importance: PolicyGradientImportance):
    """A ``check_pruning_group`` that counts unique indices (bug 3a) and refuses emptied layers (bug 8)."""

    def check(group) -> bool:
        for dep, idxs in group:
            module = dep.target.module
            if not isinstance(module, nn.Linear):
                continue
            width = graph.get_out_channels(module) if graph.is_out_channel_pruning_fn(dep.handler) \
                else graph.get_in_channels(module)
            if width is not None and len(set(idxs)) >= width:
                raise ValueError(
                    f"this step would remove all {width} channels of {importance.layer_of(module)}, "
                    f"{dep.target.name}: lower the ratio (or round_to) so that every layer keeps at least one "
                    f"KV group and one MLP channel"
                )
        return True

    return check


def _refuse_finished(importance: PolicyGradientImportance) -> None:
    """A new pruner cannot reuse an importance whose removed blocks are already gone (layers renumbered)."""
    if importance.removed_blocks and not importance.blocks_pending:
        raise ValueError("this importance's removed blocks were already deleted from the model by a finished "
                         "pruner; build the next pruner from a new search of the pruned model")


def _check_pruner(pruner: tp.pruner.BasePruner, importance: PolicyGradientImportance) -> None:
    if pruner.model is not importance.model:
        raise ValueError("the pruner and the importance were built for different models")
    if pruner.importance is not importance:
        raise ValueError("the pruner ranks with another importance object; pass this one as importance=")
    heads = kv_group_heads(pruner.model)
    for module, n_kv in heads.items():
        if module in pruner.num_heads and pruner.num_heads[module] != n_kv:
            raise ValueError(
                f"num_heads[{importance.layer_of(module)}] = {pruner.num_heads[module]}, but the layer has {n_kv} KV "
                f"groups: use num_heads=kv_group_heads(model) (Torch-Pruning's own GQA branch removes query heads "
                f"only, or nothing, torch_pruning.md bugs 4-7)"
            )
    if pruner.num_heads and pruner.prune_head_dims:
        raise ValueError("prune_head_dims=True shrinks head_dim and breaks RoPE; pass prune_head_dims=False")
    if importance.blocks_pending:
        # Not ignored, a removed block's heads would still count in Torch-Pruning's global head
        # total (initial_total_heads) while its groups are skipped, so kept layers would pay for it.
        ignored = set(pruner.ignored_layers)
        counted = [key for key, block in zip(importance.removed_blocks, importance.removed_block_modules())
                   if any(m not in ignored for m in block.modules() if isinstance(m, nn.Linear))]
        if counted:
            raise ValueError(
                f"the search removed {_format_blocks(counted)}, but the pruner does not ignore them, so their units "
                f"would count in its ratios; add importance.removed_block_modules() to ignored_layers (build_pruner "
                f"and PolicyGradientPruner do this themselves)"
            )


def _head_removals(pruner: tp.pruner.BasePruner, importance: PolicyGradientImportance, step: int) -> int:
    """KV groups the global head threshold removes at ``step`` (Torch-Pruning's own formula)."""
    ignored = set(pruner.ignored_layers)
    current = sum(pruner.num_heads.get(q, 0) for q in importance.projections("q") if q not in ignored)
    return current - int(pruner.initial_total_heads * (1 - pruner.per_step_head_pruning_ratio[step]))


def prune_step(pruner: tp.pruner.BasePruner, importance: PolicyGradientImportance | None = None) -> StepReport:
    """One ``pruner.step()`` with the Torch-Pruning 1.6.1 workarounds, for any ``BasePruner``.

    Collects every group of the step, validates it (expected projections and channels, whole KV
    groups only), refuses a step that would empty a layer before anything is pruned, then removes
    the de-duplicated channels of the Linear members, updates the importance's alive lists, and
    writes the new widths into the model and its config (:func:`removal.update_config`). The
    graph's original ``check_pruning_group`` is restored afterwards.

    With a depth-granularity result, the step that reaches ``pruner.iterative_steps`` then removes
    the importance's :attr:`~PolicyGradientImportance.removed_blocks` with the core engine
    (:func:`removal.remove_blocks`: weightless stand-ins, a layer losing both blocks is deleted and
    ``num_hidden_layers``/``layer_types`` shrink), once; earlier steps leave the blocks in place, so
    the dependency graph stays valid between steps. The pruner must ignore those blocks (see
    :meth:`PolicyGradientImportance.removed_block_modules`), or ``ValueError`` is raised first.
    """
    importance = importance if importance is not None else pruner.importance
    if not isinstance(importance, PolicyGradientImportance):
        raise TypeError("prune_step needs a PolicyGradientImportance (pass importance= or build the pruner with one)")
    _check_pruner(pruner, importance)
    importance.check_widths()
    if pruner.round_to:
        importance.min_keep_channels = max(importance.min_keep_channels, pruner.round_to)
    freeze_index_mappings(pruner.DG)
    step = pruner.current_step + 1
    head_ratio = pruner.per_step_head_pruning_ratio[step] if step < len(pruner.per_step_head_pruning_ratio) else None
    global_heads = head_ratio and pruner.global_pruning and pruner.prune_num_heads
    if global_heads and _head_removals(pruner, importance, step) <= 0:
        pruner.per_step_head_pruning_ratio[step] = 0.0  # Torch-Pruning fails on an empty head threshold
    graph = pruner.DG
    own_check = graph.__dict__.get("check_pruning_group")
    graph.check_pruning_group = _refusing_check(graph, importance)
    try:
        step_fn = tp.pruner.BasePruner.step if isinstance(pruner, PolicyGradientPruner) else type(pruner).step
        groups = list(step_fn(pruner, interactive=True))
    finally:
        if own_check is None:
            del graph.check_pruning_group
        else:
            graph.check_pruning_group = own_check
        if head_ratio is not None:
            pruner.per_step_head_pruning_ratio[step] = head_ratio
    plan = []
    for group in groups:
        kind, layer = importance.classify(group)
        if kind is None or (layer, kind) in importance.removed_blocks:
            raise GroupLayoutError(f"Torch-Pruning yielded a group the importance does not score: "
                                   f"{group[0].dep.target.name}")
        plan.append((group, kind, layer, importance.removed_positions(group, kind, layer)))
    removed = {_ATTN: 0, _MLP: 0}
    for group, kind, layer, positions in plan:
        for dep, idxs in group:
            if isinstance(dep.target.module, nn.Linear):
                dep(sorted(set(int(i) for i in idxs)))
        importance.mark_removed(kind, layer, positions)
        removed[kind] += len(positions)
    for module in pruner.model.modules():
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
    blocks = []
    if importance.blocks_pending and pruner.current_step >= pruner.iterative_steps:
        blocks = importance.removed_blocks
        layers = range(importance.space.num_layers)
        remove_blocks(pruner.model, [(i, _ATTN) in blocks for i in layers], [(i, _MLP) in blocks for i in layers])
        importance.mark_blocks_removed()
    update_config(pruner.model)
    importance.check_widths()
    report = StepReport(removed[_ATTN], removed[_MLP],
                        [(len(a), len(m)) for a, m in zip(importance.alive[_ATTN], importance.alive[_MLP])], blocks)
    logger.info("pruning step %d removed %d KV groups and %d MLP channels%s", pruner.current_step,
                report.kv_groups_removed, report.channels_removed,
                f", and the blocks {_format_blocks(blocks)}" if blocks else "")
    return report


class PolicyGradientPruner(tp.pruner.BasePruner):
    """A ``tp.pruner.BasePruner`` whose tracing and ``step()`` carry the workarounds of this module.

    Takes ``BasePruner``'s arguments. Tracing runs with eager attention and no cache (the model's
    settings are restored), ``example_inputs`` defaults to 8 random tokens, and ``step()`` is
    :func:`prune_step`. ``step(interactive=True)`` is not offered: groups must be validated and
    pruned together. The blocks the search removed (``importance.removed_block_modules()``) are
    added to ``ignored_layers``; ``step()`` deletes them at the last iterative step.
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor | dict | None = None,
                 importance: PolicyGradientImportance | None = None, **kwargs):
        if not isinstance(importance, PolicyGradientImportance):
            raise TypeError("PolicyGradientPruner needs importance=PolicyGradientImportance(...)")
        _refuse_finished(importance)
        root_types = kwargs.pop("root_module_types", [nn.Linear])
        kwargs.setdefault("output_transform", _logits)
        ignored = list(kwargs.get("ignored_layers") or [])  # blocks the search removed count in no ratio
        kwargs["ignored_layers"] = ignored + [m for m in importance.removed_block_modules() if m not in ignored]
        for name in ("num_heads", "in_channel_groups", "out_channel_groups"):  # BasePruner mutates its
            kwargs[name] = dict(kwargs.get(name) or {})  # mutable default dicts; give it fresh ones
        inputs = tracing_inputs(model, example_inputs)
        with tracing_mode(model), torch.enable_grad(), warnings.catch_warnings():
            # RMSNorm weights are reported as "unwrapped parameters": harmless here, since the
            # hidden size is frozen and per-head q/k norms are never pruned.
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            # BasePruner.__init__ walks every group, which loops forever on n_rep == 2 (bug 10)
            # before the graph can be repaired: walk none, repair, then count as it does.
            super().__init__(model, inputs, importance, root_module_types=[], **kwargs)
        freeze_index_mappings(self.DG)
        self.root_module_types = root_types
        self.initial_total_heads = self._count_heads()

    def _count_heads(self) -> int:
        """``BasePruner.__init__``'s count of attention heads over the prunable groups."""
        total = 0
        groups = self.DG.get_all_groups(ignored_layers=self.ignored_layers, root_module_types=self.root_module_types)
        for group in groups:
            if self._is_atten_group(group)[0]:
                group = self._downstream_node_as_root_if_attention(group)
                if group is None:
                    continue
            for dep, _ in group:
                if dep.target.module in self.num_heads and self.DG.is_out_channel_pruning_fn(dep.handler):
                    total += self.num_heads[dep.target.module]
                    break
        return total

    def step(self, interactive: bool = False) -> StepReport:  # type: ignore[override]
        if interactive:
            raise NotImplementedError("interactive steps are not supported; step() validates and prunes all groups")
        return prune_step(self, self.importance)


def _logits(output):
    return output.logits


def _keep_ratio(n: int, remove: int) -> float:
    """A ratio with which Torch-Pruning, keeping ``int(n·(1-r))``, removes exactly ``remove`` of ``n``.

    Passing the plain ratio loses one more unit to float error (``int(90·0.7) = 62``).
    """
    return 0.0 if remove <= 0 else 1.0 - (n - remove + 0.5) / n


def _head_schedule(n: int, remove: int, steps: int) -> list[float]:
    """Per-step head ratios removing ``remove`` of ``n`` KV groups linearly over ``steps``.

    Torch-Pruning's per-layer head pruning removes ``ceil(r·n_now)`` at each step, relative to
    the current count, so the linear schedule of ratios over-prunes when ``steps > 1``.
    """
    schedule, done = [0.0], 0
    for k in range(1, steps + 1):
        target = remove * k // steps
        schedule.append((target - done - 0.5) / (n - done) if target > done else 0.0)
        done = target
    return schedule


@dataclasses.dataclass
class _Plan:
    attn_ratio: float  # Torch-Pruning ratio of the attention (default) scope
    mlp_ratios: dict  # pruning_ratio_dict
    head_ratios: dict  # head_pruning_ratio_dict, filled in after construction (per-step lists)


def _plan(importance: PolicyGradientImportance, attn_ratio: float, mlp_ratio: float, global_pruning: bool,
          round_to: int | None, steps: int, ignored: set[nn.Module]) -> _Plan:
    """Translate the budget into Torch-Pruning ratios, refusing any that would empty a layer.

    Ratios apply to the units of the layers that are not ignored, as in Torch-Pruning; the blocks
    the search removed are among the ignored, so their units count in no ratio.
    """
    layers, model = SearchSpace.from_model(importance.model).layers, importance.model
    attn_layers = [i for i, q in enumerate(importance.projections("q")) if q not in ignored]
    mlp_layers = [i for i, g in enumerate(importance.projections("gate")) if g not in ignored]
    mlps = [getattr(layer, importance.space.spec.mlp) for layer in decoder_layers(model)]
    if global_pruning:
        floor = max(importance.min_keep_channels, round_to or 1)
        ratios = []
        for kind, ratio, pool, minimum in ((_ATTN, attn_ratio, attn_layers, 1), (_MLP, mlp_ratio, mlp_layers, floor)):
            n = sum(layers[i].num_kv_groups if kind == _ATTN else layers[i].intermediate_size for i in pool)
            remove = int(n * ratio + 1e-9)
            if pool and n - remove < minimum * len(pool):
                weakest = min(pool, key=lambda i: float(importance.unit_scores(kind, i).max()))
                raise ValueError(
                    f"removing {remove} of {n} {'KV groups' if kind == _ATTN else 'MLP channels'} leaves fewer than "
                    f"{minimum} per layer for {len(pool)} layers (layer {weakest} would be emptied); lower the ratio"
                )
            ratios.append(_keep_ratio(n, remove) if pool else 0.0)
        return _Plan(ratios[0], {tuple(mlps[i] for i in mlp_layers): ratios[1]} if mlp_layers else {}, {})
    mlp_ratios, head_ratios, widths = {}, {}, set()
    removed = set(importance.removed_blocks)
    stock = True  # update_config writes the standard fields only if no layer keeps just one block
    for i, s in enumerate(layers):
        gone = {kind for kind in (_ATTN, _MLP) if (i, kind) in removed}  # ignored, so in neither list below
        stock = stock and len(gone) != 1  # a layer losing both blocks is deleted and has no width
        n_kv, channels = s.num_kv_groups, s.intermediate_size
        if i in mlp_layers:
            channels -= int(s.intermediate_size * mlp_ratio + 1e-9)
            if round_to and channels - channels % round_to < 1:
                raise ValueError(f"mlp_ratio={mlp_ratio} keeps {channels} MLP channels of layer {i}, which "
                                 f"round_to={round_to} floors to 0; lower the ratio or round_to")
            mlp_ratios[mlps[i]] = _keep_ratio(s.intermediate_size, s.intermediate_size - channels)
        if i in attn_layers:
            n_kv -= int(s.num_kv_groups * attn_ratio + 1e-9)
            head_ratios[i] = _head_schedule(s.num_kv_groups, s.num_kv_groups - n_kv, steps)
        if not gone:
            widths.add((n_kv, s.queries_per_group, channels))
    if len(widths) == 1 and stock:
        _check_stock_config(model, *widths.pop(), round_to)
    return _Plan(attn_ratio, mlp_ratios, head_ratios)


def _mask_ratios(importance: PolicyGradientImportance, ignored: set[nn.Module]) -> tuple[float, float]:
    """Fractions of the KV groups and MLP channels the search's hard masks remove, over the units
    the pruner ranks (layers not ignored; the blocks the search removed are among the ignored)."""
    masks, space = importance.result.masks, importance.space
    ratios = []
    for role, mask, layer_slice in (("q", masks.attn, space.attn_slice), ("gate", masks.mlp, space.mlp_slice)):
        pool = [i for i, module in enumerate(importance.projections(role)) if module not in ignored]
        n = sum(layer_slice(i).stop - layer_slice(i).start for i in pool)
        kept = sum(int(mask[layer_slice(i)].sum()) for i in pool)
        ratios.append((n - kept) / n if n else 0.0)
    return ratios[0], ratios[1]


def _check_stock_config(model: nn.Module, n_kv: int, n_rep: int, intermediate: int, round_to: int | None) -> None:
    """Refuse uniform widths that the model's own config class rejects (it would fail on save and load)."""
    config = copy.deepcopy(model.config.get_text_config())
    config.num_attention_heads, config.num_key_value_heads = n_kv * n_rep, n_kv
    config.intermediate_size = intermediate - intermediate % round_to if round_to else intermediate
    validate = getattr(config, "validate", None)
    try:
        if validate is not None:
            validate()
    except Exception as exc:  # noqa: BLE001 - transformers raises several validation error types
        raise ValueError(
            f"uniform pruning to {n_kv} KV groups ({n_kv * n_rep} query heads) and {config.intermediate_size} MLP "
            f"channels gives a config {type(config).__name__} rejects: {exc}. Choose another attn_ratio (e.g. one "
            f"that keeps hidden_size divisible by the head count) or global pruning"
        ) from exc


_OWNED_OPTIONS = ("num_heads", "prune_num_heads", "prune_head_dims", "head_pruning_ratio", "pruning_ratio",
                  "pruning_ratio_dict", "global_pruning", "out_channel_groups")


def build_pruner(
    model: nn.Module,
    importance: PolicyGradientImportance,
    attn_ratio: float | None = None,
    mlp_ratio: float | None = None,
    global_pruning: bool | None = None,
    round_to: int | None = None,
    iterative_steps: int = 1,
    example_inputs: torch.Tensor | dict | None = None,
    ignored_layers: Sequence[nn.Module] = (),
    **kwargs,
) -> PolicyGradientPruner:
    """A pruner that removes ``attn_ratio`` of the KV groups and ``mlp_ratio`` of the MLP channels.

    Defaults come from the search: its attention/MLP sparsity and its ``global_budget``
    (``global_pruning=True`` ranks across layers and gives heterogeneous widths; ``False``
    removes the same number from every equal-width layer, which stock loaders can read). The
    counts match the core engine's :func:`~pg_pruning_plugin.search.hard_masks` (``int(n·ratio)``
    removed). ``round_to`` floors kept MLP widths to a multiple. Embeddings and ``lm_head`` are
    always ignored (the hidden size is frozen). Other keyword arguments go to ``BasePruner``
    (e.g. ``iterative_pruning_ratio_scheduler``, ``max_pruning_ratio``, ``isomorphic``). Budgets
    that would empty a layer raise ``ValueError`` before tracing.

    Depth-granularity results: the blocks the search removed (``importance.removed_blocks``) are
    ignored by Torch-Pruning, ratios apply to the units of the kept blocks only, and ``step()``
    deletes the removed blocks after the width pruning of the last iterative step. Cost-budget
    results (``SearchConfig(cost=...)``, one budget over both unit types) have no per-type sparsity:
    a ratio left at ``None`` is then the fraction of the ranked units (kept blocks, not ignored) that
    the search's hard masks remove, so the defaults reproduce ``result.masks`` (exactly when the
    search had no ``round_to``). Both ratios may then be 0 when the search removed blocks only.
    """
    if not isinstance(importance, PolicyGradientImportance):
        raise TypeError("importance must be a PolicyGradientImportance")
    if importance.model is not model:
        raise ValueError("the importance was built for another model object")
    importance.check_widths()
    owned = sorted(set(kwargs) & set(_OWNED_OPTIONS))
    if owned:
        raise TypeError(f"build_pruner sets {', '.join(owned)} itself; construct PolicyGradientPruner directly "
                        f"to choose them")
    _refuse_finished(importance)
    protected = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    ignored_layers = protected + importance.removed_block_modules() + list(ignored_layers)
    ignored = {m for layer in ignored_layers for m in layer.modules()}
    config = importance.result.config
    if config.cost is not None:  # one cost budget: the ratios of the search's own hard masks
        mask_attn, mask_mlp = _mask_ratios(importance, ignored)
        attn_ratio = mask_attn if attn_ratio is None else attn_ratio
        mlp_ratio = mask_mlp if mlp_ratio is None else mlp_ratio
    attn_ratio = 1.0 - config.attn_keep if attn_ratio is None else attn_ratio
    mlp_ratio = 1.0 - config.mlp_keep if mlp_ratio is None else mlp_ratio
    global_pruning = config.global_budget if global_pruning is None else global_pruning
    for name, value in (("attn_ratio", attn_ratio), ("mlp_ratio", mlp_ratio)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name}={value} must be in [0, 1): the fraction of units removed")
    if attn_ratio == 0.0 and mlp_ratio == 0.0 and not importance.removed_blocks:
        raise ValueError("attn_ratio and mlp_ratio are both 0: nothing to prune")
    if round_to is not None and round_to < 1:
        raise ValueError("round_to must be a positive integer")
    if iterative_steps < 1:
        raise ValueError("iterative_steps must be >= 1")
    if importance.removed_blocks:
        logger.info("ratios attn=%.4f, mlp=%.4f apply to the kept blocks; %s are removed after the width "
                    "pruning of step %d (the last)", attn_ratio, mlp_ratio, _format_blocks(importance.removed_blocks),
                    iterative_steps)
    plan = _plan(importance, attn_ratio, mlp_ratio, global_pruning, round_to, iterative_steps, ignored)
    pruner = PolicyGradientPruner(
        model, example_inputs, importance,
        global_pruning=global_pruning,
        # The default scope holds only attention groups; its ratio must be > 0 for Torch-Pruning
        # to reach head pruning at all, and prune_head_dims=False keeps it from cutting dims.
        pruning_ratio=plan.attn_ratio,
        pruning_ratio_dict=plan.mlp_ratios,
        num_heads=kv_group_heads(model),
        prune_num_heads=plan.attn_ratio > 0,
        prune_head_dims=False,
        head_pruning_ratio=plan.attn_ratio,
        round_to=round_to,
        iterative_steps=iterative_steps,
        ignored_layers=ignored_layers,
        **kwargs,
    )
    for layer, schedule in plan.head_ratios.items():  # read from the group's first head member
        for role in ("q", "k", "v"):
            pruner.head_pruning_ratio_dict[importance.projections(role)[layer]] = schedule
    return pruner
