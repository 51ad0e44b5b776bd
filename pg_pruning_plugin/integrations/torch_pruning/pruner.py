"""Pruning with Torch-Pruning from a search result: the ratio plan, the pruner and its step.

* :func:`build_pruner` translates the search's :class:`~pg_pruning_plugin.search.budget.Budget`
  (or explicit ratios) into Torch-Pruning ratios and returns a configured :class:`PolicyGradientPruner`;
* :func:`prune_step` runs one step of any ``tp.pruner.BasePruner`` built with a
  :class:`~pg_pruning_plugin.integrations.torch_pruning.importance.PolicyGradientImportance`: it
  collects and validates every group first, prunes them, records the removals in the importance's
  ledger and writes the new widths into the model and its config.

Results of a depth or width+depth search also remove whole attention/MLP blocks. Torch-Pruning cannot
remove a block, so the importance returns ``None`` for their groups, :func:`build_pruner` and
:class:`PolicyGradientPruner` put them in ``ignored_layers`` (they count in no ratio), and
:func:`prune_step` removes them with the core engine (``core.removal.remove_blocks``) after the width
pruning of the *last* iterative step. The Torch-Pruning 1.6.1 workarounds are in
``pg_pruning_plugin/compat/torch_pruning.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch_pruning as tp

from ...compat.torch_pruning import (
    head_schedule,
    init_base_pruner,
    keep_ratio,
    kv_group_heads,
    prune_linear_members,
    resync_linear_features,
    step_groups,
    use_kv_group_heads,
)
from ...core.architectures import SearchSpace, decoder_layers
from ...core.removal import remove_blocks, update_config
from ...core.selection import removed_count
from ...core.units import UnitValues
from ...refit import REFIT_METHODS, refit
from ...search.budget import Budget
from .importance import GroupLayoutError, PolicyGradientImportance
from .ledger import ATTN, MLP, format_blocks

__all__ = ["PolicyGradientPruner", "StepRefit", "StepReport", "build_pruner", "prune_step"]

logger = logging.getLogger(__name__)


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


def _refuse_finished(importance: PolicyGradientImportance) -> None:
    """A new pruner cannot reuse an importance whose removed blocks are already gone (layers renumbered)."""
    if importance.removed_blocks and not importance.ledger.blocks_pending:
        raise ValueError("this importance's removed blocks were already deleted from the model by a finished "
                         "pruner; build the next pruner from a new search of the pruned model")


def _check_pruner(pruner: tp.pruner.BasePruner, importance: PolicyGradientImportance) -> None:
    if pruner.model is not importance.model:
        raise ValueError("the pruner and the importance were built for different models")
    if pruner.importance is not importance:
        raise ValueError("the pruner ranks with another importance object; pass this one as importance=")
    if pruner.num_heads and pruner.prune_head_dims:
        raise ValueError("prune_head_dims=True shrinks head_dim and breaks RoPE; pass prune_head_dims=False")
    if importance.ledger.blocks_pending:
        # Not ignored, a removed block's heads would still count in Torch-Pruning's global head
        # total (initial_total_heads) while its groups are skipped, so kept layers would pay for it.
        ignored = set(pruner.ignored_layers)
        counted = [key for key, block in zip(importance.removed_blocks, importance.removed_block_modules())
                   if any(m not in ignored for m in block.modules() if isinstance(m, nn.Linear))]
        if counted:
            raise ValueError(
                f"the search removed {format_blocks(counted)}, but the pruner does not ignore them, so their units "
                f"would count in its ratios; add importance.removed_block_modules() to ignored_layers (build_pruner "
                f"and PolicyGradientPruner do this themselves)"
            )


@dataclasses.dataclass(frozen=True)
class StepRefit:
    """The weight refit of every pruning step: ``method`` (``refit.REFIT_METHODS``) on ``calibration``
    (``[N, T]`` token ids or a list of batches) with ``damping``. ``method=None``: least squares when
    calibration is given, else none."""

    method: str | None = None
    calibration: torch.Tensor | Sequence | None = None
    damping: float = 0.01

    def resolved(self) -> str:
        method = self.method or ("lstsq" if self.calibration is not None else "none")
        if method not in REFIT_METHODS:
            raise ValueError(f"refit={method!r}; choose one of {', '.join(REFIT_METHODS)}")
        if method != "none" and self.calibration is None:
            raise ValueError(f"refit={method!r} needs calibration= (token ids [N, T] or a list of batches): the "
                             f"refit fits the kept weights to the unpruned outputs on that text")
        return method


def _step_masks(model: nn.Module, plan: list, blocks: Sequence[tuple[int, str]]) -> UnitValues:
    """Keep masks over the *current* model's units: 0 for the units this step's groups remove (and for
    ``blocks``, removed after them)."""
    space = SearchSpace.from_model(model)
    masks = UnitValues.full(space, 1.0, blocks=bool(blocks))
    for _, kind, layer, positions in plan:
        flat, where = (masks.attn, space.attn_slice(layer)) if kind == ATTN else (masks.mlp, space.mlp_slice(layer))
        flat[where.start + torch.tensor(positions, dtype=torch.long)] = 0.0
    for layer, kind in blocks:
        (masks.attn_blocks if kind == ATTN else masks.mlp_blocks)[layer] = 0.0
    return masks


def prune_step(pruner: tp.pruner.BasePruner, importance: PolicyGradientImportance | None = None,
               refit_with: StepRefit | None = None) -> StepReport:
    """One ``pruner.step()`` with the Torch-Pruning 1.6.1 workarounds, for any ``BasePruner``.

    Collects every group of the step, validates it (expected projections and channels, whole KV
    groups only), refuses a step that would empty a layer before anything is pruned, then removes
    the de-duplicated channels of the Linear members, records them in the importance's ledger, and
    writes the new widths into the model and its config (``core.removal.update_config``). The
    graph's original ``check_pruning_group`` is restored afterwards.

    With a depth-granularity result, the step that reaches ``pruner.iterative_steps`` then removes
    the importance's :attr:`~PolicyGradientImportance.removed_blocks` with the core engine
    (``core.removal.remove_blocks``: weightless stand-ins, a layer losing both blocks is deleted and
    ``num_hidden_layers``/``layer_types`` shrink), once; earlier steps leave the blocks in place, so
    the dependency graph stays valid between steps. The pruner must ignore those blocks (see
    :meth:`PolicyGradientImportance.removed_block_modules`), or ``ValueError`` is raised first.

    ``refit_with`` (default: the pruner's own, for a :class:`PolicyGradientPruner`): before the groups are
    removed, the output projections are refitted on the channels the step keeps (``refit.refit``, docs/refit.md),
    so the smaller model reproduces the model the step started from; a multi-step schedule refits at every step.
    """
    importance = importance if importance is not None else pruner.importance
    refit_with = refit_with or getattr(pruner, "refit_with", None) or StepRefit()
    refit_method = refit_with.resolved()
    if not isinstance(importance, PolicyGradientImportance):
        raise TypeError("prune_step needs a PolicyGradientImportance (pass importance= or build the pruner with one)")
    _check_pruner(pruner, importance)
    use_kv_group_heads(pruner)  # a hand-built pruner's stock per-head num_heads: one head per KV group
    ledger = importance.ledger
    ledger.check_widths(pruner.model)
    if pruner.round_to:
        importance.min_keep_channels = max(importance.min_keep_channels, pruner.round_to)
    step_fn = tp.pruner.BasePruner.step if isinstance(pruner, PolicyGradientPruner) else type(pruner).step
    importance.stepping = True
    try:
        groups = step_groups(pruner, step_fn, importance.projections("q"), importance.layer_of)
    finally:
        importance.stepping = False
    plan = []
    for group in groups:
        kind, layer = importance.classify(group)
        if kind is None or (layer, kind) in importance.removed_blocks:
            raise GroupLayoutError(f"Torch-Pruning yielded a group the importance does not score: "
                                   f"{group[0].dep.target.name}")
        plan.append((group, kind, layer, importance.removed_positions(group, kind, layer)))
    last = pruner.current_step >= pruner.iterative_steps
    pending = importance.removed_blocks if ledger.blocks_pending and last else []
    if refit_method != "none":
        report = refit(pruner.model, _step_masks(pruner.model, plan, pending), refit_with.calibration, refit_method,
                       damping=refit_with.damping)
        logger.info("refit (%s) of step %d: %s", refit_method, pruner.current_step, report.mean_errors())
    removed = {ATTN: 0, MLP: 0}
    for group, kind, layer, positions in plan:
        prune_linear_members(group)
        ledger.mark_removed(kind, layer, positions)
        removed[kind] += len(positions)
    resync_linear_features(pruner.model)
    blocks = pending
    if blocks:
        layers = range(importance.space.num_layers)
        remove_blocks(pruner.model, [(i, ATTN) in blocks for i in layers], [(i, MLP) in blocks for i in layers])
        ledger.mark_blocks_removed()
    update_config(pruner.model)
    ledger.check_widths(pruner.model)
    report = StepReport(removed[ATTN], removed[MLP], ledger.kept_per_layer(), blocks)
    logger.info("pruning step %d removed %d KV groups and %d MLP channels%s", pruner.current_step,
                report.kv_groups_removed, report.channels_removed,
                f", and the blocks {format_blocks(blocks)}" if blocks else "")
    return report


class PolicyGradientPruner(tp.pruner.BasePruner):
    """A ``tp.pruner.BasePruner`` whose tracing and ``step()`` carry the Torch-Pruning workarounds.

    Takes ``BasePruner``'s arguments. Tracing runs with eager attention and no cache (the model's
    settings are restored), ``example_inputs`` defaults to 8 random tokens, and ``step()`` is
    :func:`prune_step`. ``step(interactive=True)`` is not offered: groups must be validated and
    pruned together. The blocks the search removed (``importance.removed_block_modules()``) are
    added to ``ignored_layers``; ``step()`` deletes them at the last iterative step.
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor | dict | None = None,
                 importance: PolicyGradientImportance | None = None, refit_with: StepRefit | None = None,
                 **kwargs):
        if not isinstance(importance, PolicyGradientImportance):
            raise TypeError("PolicyGradientPruner needs importance=PolicyGradientImportance(...)")
        self.refit_with = refit_with or StepRefit()
        self.refit_with.resolved()  # a bad refit fails before tracing
        _refuse_finished(importance)
        ignored = list(kwargs.get("ignored_layers") or [])  # blocks the search removed count in no ratio
        kwargs["ignored_layers"] = ignored + [m for m in importance.removed_block_modules() if m not in ignored]
        init_base_pruner(self, model, example_inputs, importance, **kwargs)

    def step(self, interactive: bool = False) -> StepReport:  # type: ignore[override]
        if interactive:
            raise NotImplementedError("interactive steps are not supported; step() validates and prunes all groups")
        return prune_step(self, self.importance)


# -- the ratio plan -----------------------------------------------------------------------------------
@dataclasses.dataclass
class _Plan:
    attn_ratio: float  # Torch-Pruning ratio of the attention (default) scope
    mlp_ratios: dict  # pruning_ratio_dict
    head_ratios: dict  # head_pruning_ratio_dict, filled in after construction (per-step lists)


def _plan(importance: PolicyGradientImportance, ratios: dict[str, float], pools: dict[str, list[int]],
          global_pruning: bool, floor_to: int | None, steps: int) -> _Plan:
    """Translate removed fractions into Torch-Pruning ratios, refusing any that would empty a layer.

    Ratios apply to the units of the ``pools`` layers (those not ignored), as in Torch-Pruning; the
    blocks the search removed are among the ignored, so their units count in no ratio. Counts follow
    the one count rule (:func:`~pg_pruning_plugin.core.selection.removed_count`), and the ratios are
    forged so that Torch-Pruning's own arithmetic reproduces them (bug 14 of docs/torch_pruning.md).
    """
    layers, model = SearchSpace.from_model(importance.model).layers, importance.model
    mlps = [getattr(layer, importance.space.spec.mlp) for layer in decoder_layers(model)]
    if global_pruning:
        floor = max(importance.min_keep_channels, floor_to or 1)
        forged = {}
        for kind, minimum in ((ATTN, 1), (MLP, floor)):
            pool = pools[kind]
            n = sum(layers[i].num_kv_groups if kind == ATTN else layers[i].intermediate_size for i in pool)
            remove = removed_count(n, ratios[kind])
            if pool and n - remove < minimum * len(pool):
                weakest = min(pool, key=lambda i: float(importance.unit_scores(kind, i).max()))
                raise ValueError(
                    f"removing {remove} of {n} {'KV groups' if kind == ATTN else 'MLP channels'} leaves fewer than "
                    f"{minimum} per layer for {len(pool)} layers (layer {weakest} would be emptied); lower the ratio"
                )
            forged[kind] = keep_ratio(n, remove) if pool else 0.0
        return _Plan(forged[ATTN], {tuple(mlps[i] for i in pools[MLP]): forged[MLP]} if pools[MLP] else {}, {})
    mlp_ratios, head_ratios, widths = {}, {}, set()
    removed = set(importance.removed_blocks)
    stock = True  # update_config writes the standard fields only if no layer keeps just one block
    for i, s in enumerate(layers):
        gone = {kind for kind in (ATTN, MLP) if (i, kind) in removed}  # ignored, so in neither pool
        stock = stock and len(gone) != 1  # a layer losing both blocks is deleted and has no width
        n_kv, channels = s.num_kv_groups, s.intermediate_size
        if i in pools[MLP]:
            channels -= removed_count(s.intermediate_size, ratios[MLP])
            if floor_to and channels - channels % floor_to < 1:
                raise ValueError(f"mlp_ratio={ratios[MLP]} keeps {channels} MLP channels of layer {i}, which "
                                 f"floor_to={floor_to} floors to 0; lower the ratio or floor_to")
            mlp_ratios[mlps[i]] = keep_ratio(s.intermediate_size, s.intermediate_size - channels)
        if i in pools[ATTN]:
            n_kv -= removed_count(s.num_kv_groups, ratios[ATTN])
            head_ratios[i] = head_schedule(s.num_kv_groups, s.num_kv_groups - n_kv, steps)
        if not gone:
            widths.add((n_kv, s.queries_per_group, channels))
    if len(widths) == 1 and stock:
        _check_stock_config(model, *widths.pop(), floor_to)
    return _Plan(ratios[ATTN], mlp_ratios, head_ratios)


def _check_stock_config(model: nn.Module, n_kv: int, n_rep: int, intermediate: int, floor_to: int | None) -> None:
    """Refuse uniform widths that the model's own config class rejects (it would fail on save and load)."""
    config = copy.deepcopy(model.config.get_text_config())
    config.num_attention_heads, config.num_key_value_heads = n_kv * n_rep, n_kv
    config.intermediate_size = intermediate - intermediate % floor_to if floor_to else intermediate
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
    floor_to: int | None = None,
    iterative_steps: int = 1,
    example_inputs: torch.Tensor | dict | None = None,
    ignored_layers: Sequence[nn.Module] = (),
    refit: str | None = None,
    calibration: torch.Tensor | Sequence | None = None,
    refit_damping: float = 0.01,
    **kwargs,
) -> PolicyGradientPruner:
    """A pruner that removes ``attn_ratio`` of the KV groups and ``mlp_ratio`` of the MLP channels.

    Defaults come from the search's :class:`~pg_pruning_plugin.search.budget.Budget`: its removed
    fractions and whether it pools all layers (``global_pruning=True`` ranks across layers and gives
    heterogeneous widths; ``False`` removes the same number from every equal-width layer, which stock
    loaders can read). Counts follow the core's count rule (``int(n·ratio)`` removed), so the
    defaults reproduce the search's hard masks. ``floor_to`` floors kept MLP widths to a multiple
    (Torch-Pruning's own ``round_to``; the search's ``round_to`` rounds to the *nearest* multiple, a
    different rule under a different name). Embeddings and ``lm_head`` are always ignored (the hidden
    size is frozen). Other keyword arguments go to ``BasePruner`` (e.g.
    ``iterative_pruning_ratio_scheduler``, ``max_pruning_ratio``, ``isomorphic``). Budgets that would
    empty a layer raise ``ValueError`` before tracing.

    Depth-granularity results: the blocks the search removed (``importance.removed_blocks``) are
    ignored by Torch-Pruning, ratios apply to the units of the kept blocks only, and ``step()``
    deletes the removed blocks after the width pruning of the last iterative step. Cost-budget
    results (one budget over both unit types) have no per-type fraction: a ratio left at ``None`` is
    then the fraction of the ranked units (kept blocks, not ignored) that the search's hard masks
    remove, so the defaults reproduce ``result.masks`` (exactly when the search had no ``round_to``).
    Both ratios may then be 0 when the search removed blocks only.

    ``refit``/``calibration``/``refit_damping``: every ``step()`` refits the output projections on the
    channels it keeps before Torch-Pruning removes the others (:class:`StepRefit`; ``refit=None``: least
    squares when ``calibration`` is given, else none; docs/refit.md).
    """
    if not isinstance(importance, PolicyGradientImportance):
        raise TypeError("importance must be a PolicyGradientImportance")
    refit_with = StepRefit(refit, calibration, refit_damping)
    refit_with.resolved()
    if importance.model is not model:
        raise ValueError("the importance was built for another model object")
    importance.ledger.check_widths(model)
    if "round_to" in kwargs:
        raise TypeError("build_pruner floors kept MLP widths with floor_to= (Torch-Pruning's round_to); the "
                        "search's round_to rounds to the nearest multiple, a different rule")
    owned = sorted(set(kwargs) & set(_OWNED_OPTIONS))
    if owned:
        raise TypeError(f"build_pruner sets {', '.join(owned)} itself; construct PolicyGradientPruner directly "
                        f"to choose them")
    _refuse_finished(importance)
    protected = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    ignored_layers = protected + importance.removed_block_modules() + list(ignored_layers)
    ignored = {m for layer in ignored_layers for m in layer.modules()}
    pools = {kind: [i for i, module in enumerate(importance.projections(role)) if module not in ignored]
             for kind, role in ((ATTN, "q"), (MLP, "gate"))}
    result = importance.result
    budget = Budget.of(result.space, result.config)
    ratios = budget.removed_fractions(result.masks, pools)
    ratios = {ATTN: ratios[ATTN] if attn_ratio is None else attn_ratio,
              MLP: ratios[MLP] if mlp_ratio is None else mlp_ratio}
    global_pruning = budget.global_pool if global_pruning is None else global_pruning
    for kind, value in ratios.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{kind}_ratio={value} must be in [0, 1): the fraction of units removed")
    if ratios[ATTN] == 0.0 and ratios[MLP] == 0.0 and not importance.removed_blocks:
        raise ValueError("attn_ratio and mlp_ratio are both 0: nothing to prune")
    if floor_to is not None and floor_to < 1:
        raise ValueError("floor_to must be a positive integer")
    if iterative_steps < 1:
        raise ValueError("iterative_steps must be >= 1")
    if importance.removed_blocks:
        logger.info("ratios attn=%.4f, mlp=%.4f apply to the kept blocks; %s are removed after the width "
                    "pruning of step %d (the last)", ratios[ATTN], ratios[MLP],
                    format_blocks(importance.removed_blocks), iterative_steps)
    plan = _plan(importance, ratios, pools, global_pruning, floor_to, iterative_steps)
    pruner = PolicyGradientPruner(
        model, example_inputs, importance, refit_with,
        global_pruning=global_pruning,
        # The default scope holds only attention groups; its ratio must be > 0 for Torch-Pruning
        # to reach head pruning at all, and prune_head_dims=False keeps it from cutting dims.
        pruning_ratio=plan.attn_ratio,
        pruning_ratio_dict=plan.mlp_ratios,
        num_heads=kv_group_heads(model),
        prune_num_heads=plan.attn_ratio > 0,
        prune_head_dims=False,
        head_pruning_ratio=plan.attn_ratio,
        round_to=floor_to,
        iterative_steps=iterative_steps,
        ignored_layers=ignored_layers,
        **kwargs,
    )
    for layer, schedule in plan.head_ratios.items():  # read from the group's first head member
        for role in ("q", "k", "v"):
            pruner.head_pruning_ratio_dict[importance.projections(role)[layer]] = schedule
    return pruner
