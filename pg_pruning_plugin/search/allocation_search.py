"""The allocation search: per-layer widths learned by policy gradient, candidates scored as shipped.

``SearchConfig(policy="allocation")`` (the default) runs this instead of the paper's per-unit
Bernoulli search (search/loop.py). The run:

1. **Level table** (search/levels.py): one sequential pass over the calibration text at the reference
   allocation (uniform widths at the budget) ranks every layer's units and fits the output weights of
   every candidate width (least squares by default).
2. **Dense targets** (search/objective.py) when ``loss="kl"``: the dense model's top-k next-token
   distribution of every calibration block, once.
3. **Steps** (search/allocation.py): on one training batch, the current allocation and ``K`` transfers
   proposed by the policy are scored as sub-networks with their table weights; REINFORCE with the
   current allocation's loss as the same-batch baseline updates the policy, and the best transfer is
   taken when it lowers the loss.
4. **Incumbent**: every ``incumbent_every`` steps the current allocation is scored on the held-in
   blocks (calibration blocks never used for steps); a better one becomes the incumbent, a worse one
   is replaced by it. The search returns the incumbent, so it never ends worse than its start on
   held-in text.

The model is unchanged afterwards; the caller refits the returned masks (``refit(model, masks, ...)``)
and removes them (``prune_model``).

Under a process group (core/distributed.py) the level table's statistics are summed over calibration
shards, a step's ``K + 1`` candidates (the current allocation and its transfers, drawn on every rank
from the same generator) are split over the ranks like the units policy's samples, and the held-in
batches of the incumbent check are split over the ranks; every rank then takes the same decisions.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from ..core import distributed
from ..core.subnetwork import OutputWeights, subnetwork
from ..core.units import UnitValues
from .allocation import AllocationSpace, TransferPolicy
from .budget import BudgetError
from .config import SearchConfig, SearchResult
from .levels import LevelTable, level_prices, reference_levels
from .loop import PolicyGradientSearch
from .objective import DenseTargets, sequence_losses

__all__ = ["AllocationSearch", "AllocationState"]

logger = logging.getLogger(__name__)


@dataclass
class AllocationState:
    """Everything the allocation search carries from one step to the next (and writes to its state file)."""

    levels: torch.Tensor  # [L, 2] current allocation
    policy: TransferPolicy
    generator: torch.Generator
    incumbent: torch.Tensor  # [L, 2] best allocation on held-in text
    incumbent_loss: float
    step: int = 0
    accepted: int = 0
    nan_samples: int = 0
    history: dict[str, list[float]] = field(default_factory=lambda: {"loss": [], "held_in": [], "accepted": []})

    def to_dict(self) -> dict:
        return {"levels": self.levels, "policy": self.policy.state_dict(), "generator": self.generator.get_state(),
                "incumbent": self.incumbent, "incumbent_loss": self.incumbent_loss, "step": self.step,
                "accepted": self.accepted, "nan_samples": self.nan_samples, "history": self.history}

    @classmethod
    def from_dict(cls, state: dict) -> AllocationState:
        generator = torch.Generator()
        generator.set_state(state["generator"])
        policy = TransferPolicy(state["levels"].shape[0])
        policy.load_state_dict(state["policy"])
        return cls(state["levels"], policy, generator, state["incumbent"], state["incumbent_loss"], state["step"],
                   state["accepted"], state["nan_samples"], state["history"])


class AllocationSearch(PolicyGradientSearch):
    """The allocation policy behind :class:`PolicyGradientSearch` (module docstring); built by it when
    ``config.policy == "allocation"``."""

    state_class = AllocationState

    def __init__(self, model, calibration, config: SearchConfig | None = None, checkpoint_path=None,
                 init_scores=None):
        super().__init__(model, calibration, config, checkpoint_path, init_scores)
        self.block = _block_size(self.space, self.config.block_size)
        floor = float(level_prices(self.space, self.block).sum())
        if self.budget.kept < floor:
            raise BudgetError(
                f"sparsity={self.budget.sparsity:.4f} keeps {self.budget.kept:,.0f} of {self.budget.total:,.0f} "
                f"prunable {self.budget.cost}, but the allocation policy keeps at least one KV group and one MLP "
                f"block of {self.block} channels per layer ({floor:,.0f}); reachable: sparsity in "
                f"(0, {1 - floor / self.budget.total:.4f}]")
        self.table: LevelTable | None = None

    def _candidates_per_step(self) -> int:
        """Losses a step computes on its batch: the current allocation's and its ``K`` transfers'."""
        return self.config.samples_per_step + 1

    def _setup(self, progress: bool) -> None:
        """Level table, transfer space and dense targets (rebuilt identically on resume)."""
        if self.table is not None:
            return
        cfg = self.config
        kept = self.budget.kept
        reference = reference_levels(self.space, self.block, kept)
        self.table = LevelTable.build(self.model, self.batches, reference, self.block, cfg.level_band, cfg.ranking,
                                      cfg.loop_refit, cfg.refit_damping, progress)
        band = self.table.band
        self.allocation = AllocationSpace(band[..., 0], band[..., 1], level_prices(self.space, self.block),
                                          int(math.floor(kept)))
        self.reference = reference
        self.targets: list[DenseTargets | None] = self._dense_targets()

    # -- scoring -------------------------------------------------------------------------------
    @torch.no_grad()
    def _local_losses(self, levels: torch.Tensor, parts: list[tuple[int, range]]) -> list[float]:
        """Mean loss of the allocation ``levels`` (as a sub-network with its table weights) on each ``(batch,
        rows)`` of ``parts``, computed here."""
        if not parts:
            return []
        masks = self.table.masks(levels)
        outputs: dict[tuple[int, str], OutputWeights] = self.table.weights(levels)
        out = []
        with subnetwork(self.model, self.space, masks, outputs):
            for b, rows in parts:
                batch = self._on_device({k: v[rows.start:rows.stop] for k, v in self.batches[b].items()})
                logits = self.model(**batch, use_cache=False).logits
                out.append(float(sequence_losses(logits, batch, self.config.loss, self.targets[b]).mean()))
        return out

    @torch.no_grad()
    def _loss(self, levels: torch.Tensor, batch_ids: list[int]) -> float:
        """Mean loss of the allocation ``levels`` over whole batches (the held-in ones, split over the ranks)."""
        own = distributed.split(len(batch_ids))
        mine = self._local_losses(levels, [(b, range(self.batches[b]["input_ids"].shape[0]))
                                           for b in batch_ids[own.start:own.stop]])
        total = 0.0
        for loss in distributed.gather_losses(torch.tensor(mine, dtype=torch.float64), own, len(batch_ids)).tolist():
            total += loss
        return total / len(batch_ids)

    @torch.no_grad()
    def _candidate_losses(self, candidates: list[torch.Tensor], b: int) -> torch.Tensor:
        """``[C]`` float64 losses of the allocations ``candidates`` on batch ``b``, each rank scoring its share of
        the candidates on its rows (``self.split``)."""
        own, rows = self.split.samples(len(candidates)), self.split.rows(self.batches[b]["input_ids"].shape[0])
        if not len(rows):
            own = range(own.start, own.start)
        mine = torch.tensor([self._local_losses(candidates[j], [(b, rows)])[0] for j in own], dtype=torch.float64)
        weights = torch.full((len(own),), float(len(rows)), dtype=torch.float64)
        return distributed.gather_losses(mine, own, len(candidates), weights)

    # -- state ---------------------------------------------------------------------------------
    def _initial_state(self, progress: bool) -> AllocationState:
        self._setup(progress)
        generator = torch.Generator().manual_seed(self.config.seed)
        levels = self.reference.clone()
        loss = self._loss(levels, self.held_in) if self.held_in else float("nan")
        return AllocationState(levels, TransferPolicy(self.space.num_layers), generator, levels.clone(), loss)

    # -- loop ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, state: AllocationState) -> float | None:
        """One step (search/allocation.py); returns the current allocation's loss on the step's batch."""
        cfg = self.config
        transfers = state.policy.sample(self.allocation, state.levels, cfg.samples_per_step, state.generator)
        scored = self._candidate_losses([state.levels] + [t.levels for t in transfers],
                                        self._train_batch(state.step))
        centre, losses = float(scored[0]), scored[1:]
        finite = torch.isfinite(losses)
        state.nan_samples += int((~finite).sum())
        state.step += 1
        if not math.isfinite(centre) or int(finite.sum()) < 2:
            return None
        transfers = [t for t, ok in zip(transfers, finite.tolist()) if ok]
        advantages = losses[finite] - centre  # same-batch baseline: the current allocation
        state.policy.update(transfers, advantages, cfg.lr)
        best = int(torch.argmin(advantages))
        if float(advantages[best]) < 0:
            state.levels = transfers[best].levels.clone()
            state.accepted += 1
        state.history["loss"].append(centre)
        state.history["accepted"].append(state.accepted)
        if self.held_in and state.step % cfg.incumbent_every == 0:
            held = self._loss(state.levels, self.held_in)
            state.history["held_in"].append(held)
            if held < state.incumbent_loss:
                state.incumbent, state.incumbent_loss = state.levels.clone(), held
            else:
                state.levels = state.incumbent.clone()
        return centre

    def _postfix(self, state: AllocationState, loss: float) -> dict[str, str]:
        return {"loss": f"{loss:.4f}", "held-in": f"{state.incumbent_loss:.4f}", "accepted": str(state.accepted)}

    def _result(self, state: AllocationState, seconds: float) -> SearchResult:
        levels = state.incumbent if self.held_in else state.levels
        masks = self.table.masks(levels)
        return SearchResult(probs=_ranked_scores(self.table, masks), masks=masks, space=self.space,
                            config=self.config, history=state.history, nan_samples=state.nan_samples,
                            seconds=seconds, levels=levels.clone())


def _block_size(space, block: int) -> int:
    """``block``, or the largest divisor of every layer's MLP width below it (reported)."""
    widths = [s.intermediate_size for s in space.layers]
    common = math.gcd(*widths)
    if common % block == 0:
        return block
    size = max(d for d in range(1, block + 1) if common % d == 0)
    logger.warning("block_size %d does not divide the MLP widths %s; using %d channels per level", block,
                   sorted(set(widths)), size)
    return size


def _ranked_scores(table: LevelTable, masks: UnitValues) -> UnitValues:
    """Per-unit scores in ``[0, 1]`` for importance-based consumers (the Torch-Pruning plugin): kept units
    above 0.5, removed units below, each layer's units ordered by the table's ranking."""
    space = table.space
    attn, mlp = torch.zeros(space.num_attn_units), torch.zeros(space.num_mlp_units)
    for i, layer in enumerate(table.layers):
        for values, offset, order, mask in ((attn, space.attn_offsets[i], layer.attn_order, masks.attn),
                                            (mlp, space.mlp_offsets[i], layer.mlp_order, masks.mlp)):
            n = order.numel()
            rank_score = 1.0 - torch.arange(n, dtype=torch.float32) / (2 * n)  # (0.5, 1], best first
            values[offset + order] = rank_score
            kept = mask[offset:offset + n] > 0.5
            values[offset:offset + n] = torch.where(kept, values[offset:offset + n], values[offset:offset + n] - 0.5)
    return UnitValues(attn, mlp)
