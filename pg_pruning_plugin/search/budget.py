"""The budget of a search: how much of the model may stay, and how that is enforced.

One object answers every budget question of a run. ``Budget.of(space, config)`` builds it once from
a :class:`~pg_pruning_plugin.search.config.SearchConfig` and refuses a budget no mask can meet
(:class:`BudgetError`, before any search step); the search loop, ``pg-prune prune``, the Torch-Pruning
plugin and the llmcompressor modifier all ask it:

* :meth:`Budget.initial_keep`: the mean keep-probability each unit type starts from;
* :meth:`Budget.start` and :meth:`Budget.project`: the probabilities brought onto the budget
  (method.md §6), at the start and after every step;
* :meth:`Budget.hard_mask`: the final 0/1 masks;
* :meth:`Budget.requested`, :meth:`Budget.accounting`: what was asked, for reports.

There are two variants. :class:`TypeBudget` is the paper's: a separate fraction of KV groups and of
MLP channels removed, over all layers or in every layer. :class:`CostBudget` is one budget in
parameters, FLOPs or custom costs over all searched units, whole blocks included (search/costs.py).
Fractions become counts through the one count rule :func:`~pg_pruning_plugin.core.selection.removed_count`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..core.architectures import SearchSpace
from ..core.selection import kept_count, removed_count, top_k_mask
from ..core.units import BLOCK_TYPES, WIDTH_TYPES, UnitValues
from .costs import budget_accounting, cost_mask, expected_cost, minimum_cost, project_to_cost, unit_costs

if TYPE_CHECKING:
    from .config import SearchConfig

__all__ = [
    "GRANULARITIES",
    "Budget",
    "BudgetError",
    "CostBudget",
    "TypeBudget",
    "hard_masks",
    "project_pools",
    "project_to_budget",
    "searched_types",
    "sparsity_for_parameters",
]

# width: KV groups and MLP channels; depth: whole attention and MLP blocks; width+depth: all four.
GRANULARITIES = ("width", "depth", "width+depth")


class BudgetError(ValueError):
    """A budget that cannot be met (it is refused before any search step)."""


def searched_types(granularity: str) -> tuple[str, ...]:
    """The unit types that carry Bernoulli keep-probabilities under ``granularity``."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    return {"width": WIDTH_TYPES, "depth": BLOCK_TYPES, "width+depth": WIDTH_TYPES + BLOCK_TYPES}[granularity]


def project_to_budget(s: torch.Tensor, budget: float, tol: float = 1e-3, max_iter: int = 20) -> torch.Tensor:
    """Shift ``s`` down by ``v ≥ 0`` so that ``Σ clamp(s − v, 0, 1) ≈ budget``; never shifts up.

    Bisection on ``v ∈ [0, max(s)]`` stopping at ``|f(v)| < tol`` or after ``max_iter`` halvings,
    then clamp to [0, 1] (method.md §6).
    """
    if s.clamp(0, 1).sum() <= budget:
        return s.clamp(0, 1)
    lo, hi = 0.0, float(s.max())
    v = hi
    for _ in range(max_iter):
        v = (lo + hi) / 2
        excess = float((s - v).clamp(0, 1).sum()) - budget
        if abs(excess) < tol:
            break
        if excess > 0:
            lo = v
        else:
            hi = v
    return (s - v).clamp(0, 1)


def project_pools(s: torch.Tensor, keep_ratio: float, offsets: Sequence[int] | None) -> torch.Tensor:
    """Project one pool (global, ``offsets=None``) or each ``offsets[l]:offsets[l+1]`` slice (per layer)."""
    if offsets is None:
        return project_to_budget(s, keep_ratio * s.numel())
    out = s.clone()
    for a, b in zip(offsets[:-1], offsets[1:]):
        out[a:b] = project_to_budget(s[a:b], keep_ratio * (b - a))
    return out


def _keep_params_sparsity(space: SearchSpace, keep_params: int) -> float:
    """The fraction of the prunable parameters to remove so that ``keep_params`` parameters remain in all."""
    if space.fixed_parameters is None:
        raise BudgetError("keep_params needs the model's parameter count; build the search space with "
                          "SearchSpace.from_model")
    prunable = space.prunable_parameters()
    fixed, total = space.fixed_parameters, space.fixed_parameters + prunable
    if not fixed < keep_params < total:
        raise BudgetError(f"keeping {keep_params:,} parameters is out of reach: it must lie between the {fixed:,} "
                          f"that are never pruned (embeddings, norms, lm_head) and the model's {total:,}")
    return (total - keep_params) / prunable


def sparsity_for_parameters(model: torch.nn.Module, keep_params: int) -> float:
    """The ``sparsity`` of ``SearchConfig(cost="params")`` that leaves ``keep_params`` parameters in all
    (embeddings, norms and ``lm_head`` are never pruned; tied tensors count once)."""
    return _keep_params_sparsity(SearchSpace.from_model(model), keep_params)


@dataclass(frozen=True, kw_only=True)
class Budget(ABC):
    """What a search may keep of ``space`` (the unpruned model) and how that is enforced; see the module docstring.

    ``round_to``: kept MLP widths of the final mask are rounded to the nearest multiple
    (:func:`~pg_pruning_plugin.core.selection.nearest_multiple`). ``seq_len``: the context length of the
    FLOPs figures in :meth:`accounting` (and of a FLOPs cost).
    """

    space: SearchSpace
    granularity: str
    round_to: int | None
    seq_len: int

    removed_count = staticmethod(removed_count)  # the one count rule

    @classmethod
    def of(cls, space: SearchSpace, config: SearchConfig) -> Budget:
        """The budget ``config`` asks of ``space``; :class:`BudgetError` if no mask can meet it."""
        common = dict(space=space, granularity=config.granularity, round_to=config.round_to,
                      seq_len=config.cost_seq_len)
        if config.cost is None:
            budget = TypeBudget(**common, attn_sparsity=_given(config.attn_sparsity, config.sparsity),
                                mlp_sparsity=_given(config.mlp_sparsity, config.sparsity),
                                global_budget=config.global_budget, mask_rule=config.mask_rule)
        else:
            sparsity = config.sparsity
            if config.keep_params is not None:
                sparsity = _keep_params_sparsity(space, config.keep_params)
            costs = unit_costs(space, config.cost, config.cost_seq_len, config.custom_costs)
            budget = CostBudget(**common, cost=config.cost, costs=costs, sparsity=sparsity,
                                keep_params=config.keep_params)
        budget.check()
        return budget

    @property
    def searched(self) -> tuple[str, ...]:
        """The unit types that carry Bernoulli keep-probabilities."""
        return searched_types(self.granularity)

    @property
    def global_pool(self) -> bool:
        """True when units compete over all layers (heterogeneous widths), False for the same rate per layer."""
        return True

    @abstractmethod
    def check(self) -> None:
        """Raise :class:`BudgetError` unless a final mask can meet the budget."""

    @abstractmethod
    def initial_keep(self, kind: str) -> float:
        """Mean keep-probability that units of type ``kind`` start from."""

    @abstractmethod
    def start(self, probs: UnitValues) -> UnitValues:
        """The search's first probabilities, from the mapped initial scores ``probs``."""

    @abstractmethod
    def project(self, probs: UnitValues) -> UnitValues:
        """``probs`` shifted down (never up) onto the budget and clamped to [0, 1] (method.md §6)."""

    @abstractmethod
    def hard_mask(self, probs: UnitValues) -> UnitValues:
        """The final 0/1 masks of keep-probabilities ``probs``."""

    @abstractmethod
    def requested(self) -> dict:
        """What the budget asks for, as plain data (``cost`` is None for the per-type budget)."""

    @abstractmethod
    def achieved(self, masks: UnitValues) -> dict | None:
        """Requested vs kept cost of final ``masks`` (None for the per-type budget)."""

    @abstractmethod
    def removed_fractions(self, masks: UnitValues, layers: dict[str, list[int]]) -> dict[str, float]:
        """Per width type, the fraction of the units of ``layers[kind]`` that a pruner ranking only those
        layers removes to realise this budget, given the search's final ``masks``."""

    def accounting(self, masks: UnitValues) -> dict:
        """Requested vs achieved prunable parameters and FLOPs of final ``masks``
        (:func:`~pg_pruning_plugin.search.costs.budget_accounting`)."""
        requested = self.requested()
        cost, kept = requested["cost"], requested.get("kept_cost")
        return budget_accounting(self.space, masks, self.seq_len,
                                 requested_params=kept if cost == "params" else None,
                                 requested_flops=kept if cost == "flops" else None)


def _given(value: float | None, default: float) -> float:
    return default if value is None else value


@dataclass(frozen=True, kw_only=True)
class TypeBudget(Budget):
    """The paper's budget: the fraction ``attn_sparsity`` of the KV groups and ``mlp_sparsity`` of the MLP
    channels removed, over all layers (``global_budget``) or in every layer; ``mask_rule`` picks the per-layer
    counts of a global final mask (:data:`~pg_pruning_plugin.core.selection.MASK_RULES`)."""

    attn_sparsity: float
    mlp_sparsity: float
    global_budget: bool
    mask_rule: str

    @property
    def global_pool(self) -> bool:
        return self.global_budget

    def _sparsity(self, kind: str) -> float:
        return self.attn_sparsity if kind == "attn" else self.mlp_sparsity

    def _min_channels(self, kind: str) -> int:
        return 1 if kind == "attn" else self.round_to or 1

    def _offsets(self, kind: str) -> list[int]:
        return self.space.attn_offsets if kind == "attn" else self.space.mlp_offsets

    def check(self) -> None:
        if not self.global_pool:
            return
        layers = self.space.num_layers
        for kind in WIDTH_TYPES:
            n = self._offsets(kind)[-1]
            kept, need = kept_count(n, 1.0 - self._sparsity(kind)), layers * self._min_channels(kind)
            if kept < need:
                name = "KV groups" if kind == "attn" else "MLP channels"
                raise BudgetError(f"keeping {kept} of {n} {name} leaves fewer than {need // layers} per layer "
                                  f"({layers} layers); lower the {kind} sparsity")

    def initial_keep(self, kind: str) -> float:
        return 1.0 - self._sparsity(kind)

    def start(self, probs: UnitValues) -> UnitValues:
        return probs  # the score mapping already gives each type its keep rate

    def project(self, probs: UnitValues) -> UnitValues:
        return UnitValues(**{
            kind: project_pools(value, self.initial_keep(kind), None if self.global_pool else self._offsets(kind))
            for kind, value in probs.as_dict().items()})

    def hard_mask(self, probs: UnitValues) -> UnitValues:
        return UnitValues(*(top_k_mask(getattr(probs, kind), self.initial_keep(kind), self._offsets(kind),
                                       self.global_pool, min_keep=self._min_channels(kind),
                                       round_to=self.round_to if kind == "mlp" else None, rule=self.mask_rule)
                            for kind in WIDTH_TYPES))

    def requested(self) -> dict:
        return {"granularity": self.granularity, "cost": None, "attn_sparsity": self.attn_sparsity,
                "mlp_sparsity": self.mlp_sparsity, "global_budget": self.global_budget}

    def achieved(self, masks: UnitValues) -> dict | None:
        return None

    def removed_fractions(self, masks: UnitValues, layers: dict[str, list[int]]) -> dict[str, float]:
        return {kind: self._sparsity(kind) for kind in WIDTH_TYPES}


@dataclass(frozen=True, kw_only=True)
class CostBudget(Budget):
    """One budget: the fraction ``sparsity`` of the prunable ``cost`` (params, flops or custom, per unit
    ``costs``) removed over all searched units; ``keep_params``, when the budget was given as a parameter
    count, is that count (``sparsity`` is then derived from it)."""

    cost: str
    costs: UnitValues
    sparsity: float
    keep_params: int | None = None

    @property
    def total(self) -> float:
        """The prunable cost of the unpruned model."""
        return float(self.costs.attn.sum() + self.costs.mlp.sum())

    @property
    def kept(self) -> float:
        """The cost a final mask may keep."""
        return (1.0 - self.sparsity) * self.total

    def check(self) -> None:
        floor = minimum_cost(self.costs, self.space, self.granularity, self.round_to or 1)
        if self.kept < floor:
            rule = {"width": "one KV group and one MLP channel per layer", "depth": "one block of one decoder layer",
                    "width+depth": "one unit of one block"}[self.granularity]
            raise BudgetError(
                f"sparsity={self.sparsity} keeps {self.kept:,.0f} of {self.total:,.0f} ({self.cost}), but at least "
                f"{floor:,.0f} must stay ({rule}); reachable: sparsity in (0, {1 - floor / self.total:.4f}]"
            )

    def initial_keep(self, kind: str) -> float:
        # under width+depth both a unit and its block start at sqrt(keep), so the expected kept cost is keep
        keep = 1.0 - self.sparsity
        return math.sqrt(keep) if self.granularity == "width+depth" else keep

    def start(self, probs: UnitValues) -> UnitValues:
        return self.project(probs)

    def project(self, probs: UnitValues) -> UnitValues:
        return project_to_cost(probs, self.costs, self.space, self.kept, self.searched)

    def hard_mask(self, probs: UnitValues) -> UnitValues:
        return cost_mask(probs, self.costs, self.space, self.kept, self.searched, self.round_to or 1, self.round_to)

    def requested(self) -> dict:
        return {"granularity": self.granularity, "cost": self.cost, "cost_sparsity": self.sparsity,
                "kept_cost": self.kept, "dense_cost": self.total, "keep_params": self.keep_params}

    def achieved(self, masks: UnitValues) -> dict | None:
        kept = expected_cost(masks, self.costs, self.space)  # exact kept cost of 0/1 masks
        return {"cost": self.cost, "dense": self.total, "requested_kept": self.kept, "kept": kept,
                "requested_sparsity": self.sparsity, "effective_sparsity": 1 - kept / self.total}

    def removed_fractions(self, masks: UnitValues, layers: dict[str, list[int]]) -> dict[str, float]:
        fractions = {}
        for kind, layer_slice in (("attn", self.space.attn_slice), ("mlp", self.space.mlp_slice)):
            mask = getattr(masks, kind)
            n = sum(layer_slice(i).stop - layer_slice(i).start for i in layers[kind])
            kept = sum(int(mask[layer_slice(i)].sum()) for i in layers[kind])
            fractions[kind] = (n - kept) / n if n else 0.0
        return fractions


def hard_masks(probs: UnitValues, space: SearchSpace, config: SearchConfig) -> UnitValues:
    """The final 0/1 masks of ``probs`` under ``config``'s budget (``Budget.of(space, config).hard_mask``)."""
    return Budget.of(space, config).hard_mask(probs)
