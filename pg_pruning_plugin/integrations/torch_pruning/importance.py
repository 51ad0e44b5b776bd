"""Learned keep-probabilities as a Torch-Pruning importance, and the group layouts it recognises.

The importance scores one *unit* per KV group (one KV head and its ``n_rep`` query heads) and per
MLP channel; Torch-Pruning asks for one score per root channel of a group, so a KV group's score
is repeated over its ``n_rep·head_dim`` query-space channels. Groups the importance does not own
(stand-alone k/v, the residual stream, embeddings, lm_head) get ``None``. Scores are the ranks of
the keep-probabilities (ties broken by unit id, lower ranks pruned first), keyed by the original
unit ids through the run's :class:`~pg_pruning_plugin.integrations.torch_pruning.ledger.UnitLedger`,
so they stay valid while iterative pruning shifts channel indices. Each layer's best units get a
bonus above every rank, so global ranking never selects a whole layer (bug 8 of docs/torch_pruning.md).

Every group is checked to couple exactly the expected members (q/k/v rows and o columns of whole KV
groups, or gate/up rows and down columns of channels, of one layer); anything else is a
:class:`GroupLayoutError`.

Building the importance makes every later Torch-Pruning trace of the model run with eager attention
and no KV cache (``compat.torch_pruning.trace_in_tracing_mode``), so a pruner built as Torch-Pruning's
examples build one traces correctly. Pruning goes through ``prune_step``: a plain ``BasePruner.step()``
asking this importance is refused before anything is pruned (bug 15 of docs/torch_pruning.md).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn
import torch_pruning as tp

from ...compat.torch_pruning import calling_pruner, trace_in_tracing_mode
from ...core.architectures import SearchSpace, decoder_layers, projections
from ...search.config import SearchResult
from .ledger import ATTN, MLP, UnitLedger, format_blocks

__all__ = ["GroupLayoutError", "PolicyGradientImportance"]

logger = logging.getLogger(__name__)

_OUT, _IN = "prune_out_channels", "prune_in_channels"


class GroupLayoutError(RuntimeError):
    """Torch-Pruning coupled a removal with modules other than the expected projections."""


def _handler(dep) -> str:
    return getattr(dep.handler, "__name__", "")


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """0..n-1 in ascending order of ``values``; ties broken by position (stable)."""
    order = torch.argsort(values.float(), stable=True)
    ranks = torch.empty(values.numel(), dtype=torch.float32)
    ranks[order] = torch.arange(values.numel(), dtype=torch.float32)
    return ranks


def _describe(shape) -> str:
    return (f"{shape.num_kv_groups} KV groups x {shape.queries_per_group} queries, head_dim {shape.head_dim}, "
            f"{shape.intermediate_size} MLP channels")


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
                 for kind, value in ((ATTN, masks.attn_blocks), (MLP, masks.mlp_blocks)) if not value[i])


def _refuse_plain_step() -> None:
    """Raise if a ``BasePruner`` step other than ``prune_step``'s asks for scores (bug 15), after putting the
    pruner's step counter back; a direct call (to inspect scores) passes."""
    pruner = calling_pruner()
    if pruner is None:
        return
    pruner.current_step -= 1  # BasePruner.step counted a step that prunes nothing
    raise RuntimeError(
        "PolicyGradientImportance prunes through prune_step(pruner): a plain pruner.step() (or `for g in "
        "pruner.step(interactive=True): g.prune()`) would keep every KV group (Torch-Pruning 1.6.1 rejects GQA groups "
        "silently), cut per-head norms and leave the config stale. Replace the step by `prune_step(pruner)` (from "
        "pg_pruning_plugin.integrations.torch_pruning), or build the pruner with build_pruner, whose step() is "
        "prune_step. Nothing was pruned"
    )


class PolicyGradientImportance(tp.importance.Importance):
    """One score per root channel of attention and MLP groups, from a finished policy-gradient search.

    ``search``: a :class:`SearchResult` or a path written by :meth:`SearchResult.save`; it must
    describe ``model`` as it is now (same family and widths), or a ``ValueError`` says where they
    differ. ``min_keep_channels``: MLP channels of every layer that global ranking never selects
    (default: the search's ``round_to`` or 1; ``prune_step`` raises it to the pruner's ``round_to``);
    the best KV group of every layer is always kept. :attr:`ledger` tracks which units are still
    present as pruning proceeds.

    Returns ``None`` for groups it does not own and for the groups of blocks the search removed
    (depth granularities: :attr:`removed_blocks`, deleted by ``prune_step`` at the last step);
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
        self._ranks = {ATTN: _ranks(result.probs.attn), MLP: _ranks(result.probs.mlp)}
        self._slices = {ATTN: space.attn_slice, MLP: space.mlp_slice}
        self._roles: dict[nn.Module, tuple[int, str]] = {}
        self._modules: dict[tuple[int, str], nn.Module] = {}
        for p in projections(model):
            self._roles[p.linear] = (p.layer, p.role)
            self._modules[(p.layer, p.role)] = p.linear
        self._model_modules = set(model.modules())
        self._removed = _search_removed_blocks(result)
        spec = space.spec
        self._blocks: dict[tuple[int, str], nn.Module] = {
            (i, kind): getattr(layer, spec.attention if kind == ATTN else spec.mlp)
            for i, layer in enumerate(decoder_layers(model)) for kind in (ATTN, MLP)
        }
        self.ledger = UnitLedger(space, self._removed, result.masks.has_blocks)
        self.stepping = False  # set by prune_step while it collects a step's groups
        trace_in_tracing_mode(model)
        if self._removed:
            logger.info("the search removed %d blocks (%s); the importance skips their groups and prune_step "
                        "removes them at the pruner's last step", len(self._removed), format_blocks(self._removed))

    # -- removed blocks (depth granularities) -----------------------------------------------
    @property
    def removed_blocks(self) -> list[tuple[int, str]]:
        """``(layer, "attn" | "mlp")`` of every block the search removed, in original layer numbering."""
        return list(self._removed)

    def removed_block_modules(self) -> list[nn.Module]:
        """The attention/MLP modules of :attr:`removed_blocks` as they are in the model before removal:
        what a hand-built ``BasePruner`` needs in ``ignored_layers`` (``build_pruner`` adds them itself)."""
        return [self._blocks[key] for key in self._removed]

    # -- scores ----------------------------------------------------------------------------
    def unit_scores(self, kind: str, layer: int) -> torch.Tensor:
        """Scores of layer ``layer``'s original units (ranks; the protected best ones lifted above all)."""
        ranks = self._ranks[kind]
        scores = ranks[self._slices[kind](layer)].clone()
        keep = 1 if kind == ATTN else min(self.min_keep_channels, scores.numel())
        scores[torch.topk(scores, keep).indices] += ranks.numel()
        return scores

    def __call__(self, group) -> torch.Tensor | None:
        if not self.stepping:
            _refuse_plain_step()
        kind, layer = self.classify(group)
        if kind is None or (layer, kind) in self._removed:
            return None  # not ours, or a block the search removed: the engine deletes it, not Torch-Pruning
        shape = self.space.layers[layer]
        scores = self.unit_scores(kind, layer)[self.ledger.alive[kind][layer]]
        if kind == ATTN:
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
            kind = ATTN
        elif (role, fn) in (("gate", _OUT), ("up", _OUT), ("down", _IN)):
            kind = MLP
        elif role in ("k", "v") and fn == _OUT:
            if linears == {root}:
                return None, None  # stand-alone k/v group: k/v without their queries must never be pruned
            kind = ATTN  # plain multi-head attention: q/k/v/o coupled 1:1, rooted in key space
        else:
            return None, None  # the residual stream (hidden size), never pruned here
        self._check_members(group, kind, layer)
        return kind, layer

    def expected_members(self, group, kind: str, layer: int) -> dict[nn.Module, tuple[str, set[int]]]:
        """Linear members of a group and the channel set each must lose, from the root indices."""
        root_role = self._roles[group[0].dep.target.module][1]
        root_idxs = {int(i) for i in group[0].idxs}
        m = {role: self._modules[(layer, role)] for role in ("q", "k", "v", "o", "gate", "up", "down")}
        if kind == MLP:
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
        expected = self.expected_members(group, kind, layer)
        head_dim = self.space.layers[layer].head_dim
        seen = set()
        for dep, idxs in group:
            module = dep.target.module
            if isinstance(module, nn.Parameter):
                if kind == ATTN and module.dim() == 1 and module.numel() == head_dim:
                    continue  # per-head q/k norm weight: shared by all heads, untouched by whole-head removal
                problem = f"parameter of shape {tuple(module.shape)}"
            elif module in expected:
                fn, channels = expected[module]
                if _handler(dep) == fn and {int(i) for i in idxs} == channels:
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

    def removed_positions(self, group, kind: str, layer: int) -> list[int]:
        """Current positions of the units a removal group deletes; refuses partial KV groups."""
        idxs = sorted({int(i) for i in group[0].idxs})
        if kind == MLP:
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

    def projections(self, role: str) -> list[nn.Module]:
        """The ``role`` projection (``"q"``, ``"gate"``, ...) of every layer."""
        return [self._modules[(i, role)] for i in range(self.space.num_layers)]

    def layer_of(self, module: nn.Module) -> str:
        """``"layer i"`` for a projection of the model, else its class name (for error messages)."""
        role = self._roles.get(module)
        return f"layer {role[0]} ({role[1]}_proj)" if role else type(module).__name__
