"""The policy-gradient search loop: forward passes only, under ``torch.no_grad()``.

One step (method.md §3–§6)::

    m_j ~ Bernoulli(s)                     j = 1..K, shared minibatch x
    L_j = CE(model masked by m_j; x)       NaN samples dropped and counted
    b   = EMA_W(mean_j L_j)                includes the current batch
    s  <- s - lr_t · 1/(K-1) Σ_j (L_j - b)(m_j - s)/sqrt(s(1-s))
    s  <- project(s) onto Σ s = r·n        per unit type, globally or per layer
    lr_t: cosine from lr to 0 over all steps

The model is never modified: masks act through hooks that are removed after every forward
(``execution="gather"`` swaps in the kept weights for the duration of one forward, see subnetwork.py).
``estimator`` replaces the authors' estimator by a leave-one-out or antithetic one (policy.py).
``granularity`` adds whole attention/MLP blocks as units, and ``cost`` replaces the per-type budgets
by one budget in parameters or FLOPs (budget.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.architectures import ARCHITECTURES, LayerShape, SearchSpace
from .budget import (BLOCK_TYPES, COSTS, WIDTH_TYPES, BudgetError, check_custom_costs, cost_mask,
                     minimum_cost, project_to_cost, searched_types, unit_costs)
from ..core.masking import UnitMasks, masked
from ..scoring.metrics import METRICS, UnitScores, block_influence, compute_metric
from .policy import (ESTIMATORS, INIT_MAPPINGS, MASK_RULES, policy_gradient, project_pools, sample_masks,
                     scores_from_metric, top_k_mask, usable_samples)
from ..core.subnetwork import subnetwork

__all__ = ["PolicyGradientSearch", "ResumeError", "SearchConfig", "SearchResult"]

logger = logging.getLogger(__name__)

EXECUTIONS = ("mask", "gather")  # masking.masked / subnetwork.subnetwork


class ResumeError(ValueError):
    """A search-state file that is corrupt or belongs to another model or configuration."""


@dataclass
class SearchConfig:
    """Everything that defines a search. Defaults: the authors' LLaMA-2-7B run (method.md §9).

    Sparsities are fractions of units *removed*; ``attn_sparsity``/``mlp_sparsity`` default to
    ``sparsity`` (the paper's separate budgets with one ratio). With a ``cost`` there is one budget
    instead: ``sparsity`` is the fraction of the prunable cost (q/k/v/o/gate/up/down parameters, or
    their forward FLOPs per token at ``cost_seq_len``) removed. ``granularity`` other than ``width``
    searches whole attention/MLP blocks too and always uses one budget (``cost`` defaults to params).
    """

    sparsity: float = 0.3
    attn_sparsity: float | None = None
    mlp_sparsity: float | None = None
    global_budget: bool = True  # heterogeneous widths; False = the same keep rate in every layer
    steps: int = 15000
    samples_per_step: int = 2  # K
    lr: float = 2e-3
    baseline_window: int = 5  # W; 0 disables the baseline (plain REINFORCE)
    batch_size: int = 8
    max_epochs: int = 1  # passes allowed over the calibration blocks
    init: str = "wanda-sp"
    init_mapping: str = "sigmap"  # policy.INIT_MAPPINGS
    init_confidence: float = 0.9  # keep-probability of init-mask units under init_mapping="mask"
    init_batches: int = 16  # calibration batches used by activation metrics
    round_to: int | None = None  # kept MLP widths rounded to a multiple
    seed: int = 42
    checkpoint_every: int = 100
    samples_in_one_forward: bool = True  # evaluate the K samples as one [K·B, T] batch
    mask_rule: str = "topk"  # final mask: global top-k (paper) or per-layer expected width, policy.MASK_RULES
    estimator: str = "authors"  # one of policy.ESTIMATORS: authors | loo | antithetic
    execution: str = "mask"  # mask: zero dropped units; gather: skip them, one forward per sample
    granularity: str = "width"  # budget.GRANULARITIES: width | depth | width+depth
    cost: str | None = None  # None: separate budgets per unit type (paper); params | flops | custom: one budget
    cost_seq_len: int = 2048  # context length of the FLOPs cost
    custom_costs: dict[str, float] | None = None  # cost="custom": {"attn": per KV group, "mlp": per channel}

    def __post_init__(self) -> None:
        searched_types(self.granularity)  # validates the name
        if self.cost is None and self.granularity != "width":
            self.cost = "params"
        if self.cost is not None:
            if self.cost not in COSTS:
                raise ValueError(f"cost={self.cost!r}; choose one of {', '.join(COSTS)} (or None for separate budgets)")
            if self.cost == "custom":
                check_custom_costs(self.custom_costs)
            if self.attn_sparsity is not None or self.mlp_sparsity is not None:
                raise ValueError("one cost budget has one ratio: set sparsity, not attn_sparsity/mlp_sparsity")
            if not self.global_budget:
                raise ValueError("a cost budget is one global budget; per-layer (uniform) budgets need cost=None")
            if self.mask_rule != "topk":
                raise ValueError("mask_rule applies to separate budgets; a cost budget always drops the least "
                                 "probable units until the kept cost fits")
        if self.cost_seq_len < 1:
            raise ValueError("cost_seq_len must be a positive number of tokens")
        for name in ("sparsity", "attn_sparsity", "mlp_sparsity"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise ValueError(f"{name}={value} must be in (0, 1): the fraction of units removed")
        if self.samples_per_step < 2:
            raise ValueError("samples_per_step must be >= 2 (the estimator divides by K-1)")
        if self.steps < 1 or self.batch_size < 1 or self.max_epochs < 1:
            raise ValueError("steps, batch_size and max_epochs must be positive")
        if self.init not in METRICS:
            raise ValueError(f"init={self.init!r}; choose one of {', '.join(METRICS)}")
        if self.round_to is not None and self.round_to < 1:
            raise ValueError("round_to must be a positive integer")
        if self.init_mapping not in INIT_MAPPINGS:
            raise ValueError(f"init_mapping={self.init_mapping!r}; choose one of {', '.join(INIT_MAPPINGS)}")
        if not 0.5 < self.init_confidence < 1.0:
            raise ValueError("init_confidence must be in (0.5, 1): 1 would freeze the scores (method.md §4)")
        if self.mask_rule not in MASK_RULES:
            raise ValueError(f"mask_rule={self.mask_rule!r}; choose one of {', '.join(MASK_RULES)}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator={self.estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        if self.estimator == "antithetic" and self.samples_per_step % 2:
            raise ValueError("the antithetic estimator needs an even samples_per_step (pairs u, 1-u)")
        if self.execution not in EXECUTIONS:
            raise ValueError(f"execution={self.execution!r}; choose one of {', '.join(EXECUTIONS)}")

    @property
    def searched(self) -> tuple[str, ...]:
        """The unit types that carry Bernoulli keep-probabilities (budget.searched_types)."""
        return searched_types(self.granularity)

    @property
    def width_keep(self) -> float:
        """Initial mean keep-probability of the width units (block units: the same under width+depth,
        so that the expected kept cost starts at ``1 − sparsity``)."""
        keep = 1.0 - self.sparsity
        return math.sqrt(keep) if self.granularity == "width+depth" else keep

    @property
    def attn_keep(self) -> float:
        return 1.0 - (self.attn_sparsity if self.attn_sparsity is not None else self.sparsity)

    @property
    def mlp_keep(self) -> float:
        return 1.0 - (self.mlp_sparsity if self.mlp_sparsity is not None else self.sparsity)


@dataclass
class SearchResult:
    """Learned keep-probabilities, the hard masks derived from them, and the loss trace."""

    probs: UnitScores
    masks: UnitScores  # 0/1
    space: SearchSpace
    config: SearchConfig
    history: dict[str, list[float]] = field(default_factory=dict)
    nan_samples: int = 0
    seconds: float = 0.0

    def save(self, path: str | os.PathLike) -> None:
        """Write probabilities, masks, config and layer shapes (tensors and plain data only)."""
        blob = {
            "probs": self.probs.as_dict(),
            "masks": self.masks.as_dict(),
            "config": dataclasses.asdict(self.config),
            "layers": [dataclasses.astuple(s) for s in self.space.layers],
            "model_type": self.space.model_type,
            "hidden_size": self.space.hidden_size,
            "history": self.history, "nan_samples": self.nan_samples, "seconds": self.seconds,
        }
        tmp = Path(f"{path}.tmp")
        torch.save(blob, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SearchResult:
        """Read a file written by :meth:`save`."""
        blob = torch.load(path, weights_only=True)
        space = SearchSpace(ARCHITECTURES[blob["model_type"]], [LayerShape(*s) for s in blob["layers"]],
                            blob["hidden_size"], blob["model_type"])
        return cls(
            probs=UnitScores(**blob["probs"]), masks=UnitScores(**blob["masks"]), space=space,
            config=SearchConfig(**blob["config"]), history=blob["history"], nan_samples=blob["nan_samples"],
            seconds=blob["seconds"],
        )

    def kept_per_layer(self) -> list[tuple[int, int]]:
        """(kept KV groups, kept MLP channels) of every layer; 0 where the whole block is removed."""
        masks, out = self.masks, []
        for i in range(self.space.num_layers):
            attn = int(masks.attn[self.space.attn_slice(i)].sum()) if not masks.has_blocks or masks.attn_blocks[i] else 0
            mlp = int(masks.mlp[self.space.mlp_slice(i)].sum()) if not masks.has_blocks or masks.mlp_blocks[i] else 0
            out.append((attn, mlp))
        return out


def cost_budget(space: SearchSpace, config: SearchConfig) -> tuple[UnitScores, float]:
    """Per-unit costs and the kept-cost budget of a ``config`` with a ``cost``; refuses unreachable budgets."""
    costs = unit_costs(space, config.cost, config.cost_seq_len, config.custom_costs)
    total = float(costs.attn.sum() + costs.mlp.sum())
    budget = (1.0 - config.sparsity) * total
    floor = minimum_cost(costs, space, config.granularity, config.round_to or 1)
    if budget < floor:
        raise BudgetError(
            f"sparsity={config.sparsity} keeps {budget:,.0f} of {total:,.0f} ({config.cost}), but at least "
            f"{floor:,.0f} must stay ({_floor_rule(config.granularity)}); reachable: sparsity in "
            f"(0, {1 - floor / total:.4f}]"
        )
    return costs, budget


def _floor_rule(granularity: str) -> str:
    return {"width": "one KV group and one MLP channel per layer", "depth": "one block of one decoder layer",
            "width+depth": "one unit of one block"}[granularity]


def check_unit_budget(space: SearchSpace, config: SearchConfig) -> None:
    """Separate budgets: refuse a global budget that keeps fewer units than layers (one each must stay)."""
    for name, keep, n in (("attn", config.attn_keep, space.num_attn_units), ("mlp", config.mlp_keep, space.num_mlp_units)):
        kept = n - int(n * (1 - keep) + 1e-9)
        need = space.num_layers * (1 if name == "attn" else config.round_to or 1)
        if config.global_budget and kept < need:
            kind = "KV groups" if name == "attn" else "MLP channels"
            raise BudgetError(f"keeping {kept} of {n} {kind} leaves fewer than {need // space.num_layers} per layer "
                              f"({space.num_layers} layers); lower the {name} sparsity")


def hard_masks(probs: UnitScores, space: SearchSpace, config: SearchConfig) -> UnitScores:
    """Hard masks of the keep-probabilities: per unit type (``config.mask_rule``, ≥ 1 unit per layer),
    or, with a ``config.cost``, the least probable units dropped until the kept cost fits (budget.cost_mask)."""
    if config.cost is not None:
        costs, budget = cost_budget(space, config)
        return cost_mask(probs, costs, space, budget, config.searched, config.round_to or 1, config.round_to)
    attn = top_k_mask(probs.attn, config.attn_keep, space.attn_offsets, config.global_budget, rule=config.mask_rule)
    mlp = top_k_mask(
        probs.mlp, config.mlp_keep, space.mlp_offsets, config.global_budget,
        min_keep=config.round_to or 1, round_to=config.round_to, rule=config.mask_rule,
    )
    return UnitScores(attn, mlp)


def sample_losses(model: nn.Module, space: SearchSpace, batch: dict[str, torch.Tensor], masks: UnitMasks,
                  one_forward: bool = True, execution: str = "mask") -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch`` under each mask sample: ``[S]``.

    ``execution="gather"`` runs each sample's sub-network (one forward per sample).
    """
    masks = masks.folded(space)
    if masks.num_samples > 1 and (not one_forward or execution == "gather"):
        return torch.cat([
            sample_losses(model, space, batch, UnitMasks(masks.attn[j], masks.mlp[j]), execution=execution)
            for j in range(masks.num_samples)
        ])
    s = masks.num_samples
    ids = batch["input_ids"].repeat(s, 1)  # [S·B, T], sample-major
    attention_mask = batch.get("attention_mask")
    labels = ids if attention_mask is None else ids.masked_fill(attention_mask.repeat(s, 1) == 0, -100)
    with (subnetwork if execution == "gather" else masked)(model, space, masks):
        logits = model(
            input_ids=ids, attention_mask=None if attention_mask is None else attention_mask.repeat(s, 1),
            use_cache=False,
        ).logits
    ce = torch.cat([  # one sequence at a time: no float copy or log-softmax of all S·B·T·V logits at once
        F.cross_entropy(logits[i, :-1].float(), labels[i, 1:], reduction="none", ignore_index=-100)
        for i in range(logits.shape[0])
    ])  # [S·B·(T-1)]
    valid = (labels[:, 1:] != -100).view(s, -1).sum(1)
    return ce.view(s, -1).sum(1) / valid.clamp_min(1)


def _cosine_lr(lr: float, step: int, total: int) -> float:
    return lr * 0.5 * (1.0 + math.cos(math.pi * step / total))


class PolicyGradientSearch:
    """Learn keep-probabilities for every KV group and MLP channel of ``model``.

    ``calibration`` holds token blocks ``[N, T]`` (or a list of batch dicts with ``input_ids`` and
    an optional ``attention_mask``). ``checkpoint_path`` enables atomic search-state snapshots
    every ``config.checkpoint_every`` steps; an existing file there is resumed from.

    >>> search = PolicyGradientSearch(model, blocks, SearchConfig(sparsity=0.3, steps=200))
    >>> result = search.run()          # result.probs, result.masks
    >>> small = prune_model(model, result.masks)   # pg_pruning_plugin.removal
    """

    def __init__(
        self,
        model: nn.Module,
        calibration: torch.Tensor | list[dict[str, torch.Tensor]],
        config: SearchConfig | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        init_scores: UnitScores | None = None,
    ):
        self.model = model
        self.config = config or SearchConfig()
        self.space = SearchSpace.from_model(model)
        if self.space.has_removed_blocks:
            raise ValueError("the model already has removed blocks; run the search on the unpruned model")
        if self.config.cost is None:
            check_unit_budget(self.space, self.config)
        else:
            cost_budget(self.space, self.config)  # refuses an unreachable budget before any work
        self.batches = _as_batches(calibration, self.config.batch_size)
        needed = self.config.steps
        available = len(self.batches) * self.config.max_epochs
        if available < needed:
            raise ValueError(
                f"{len(self.batches)} calibration batches of {self.config.batch_size} x {self.batches[0]['input_ids'].shape[1]} "
                f"tokens allow {available} steps with max_epochs={self.config.max_epochs}, but steps={needed}: "
                f"give more calibration text, fewer steps, a smaller batch or a larger max_epochs"
            )
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self._init_scores = init_scores

    # -- state -----------------------------------------------------------------------------
    def initial_probabilities(self, progress: bool = True) -> UnitScores:
        """Keep-probabilities the search starts from: ``init_scores`` or the mapped init metrics.

        Width units map ``config.init`` per layer; both block units of a layer map the layer's
        influence (1 − cosine similarity of the residual stream across the decoder layer, ShortGPT)
        over all layers. Units that are not searched stay at 1. With a cost budget the result is
        projected onto it.
        """
        if self._init_scores is None:
            cfg, space = self.config, self.space
            calibration = [b["input_ids"] for b in self.batches[: cfg.init_batches]]
            mapping = "const" if cfg.init == "constant" else cfg.init_mapping
            separate = cfg.cost is None
            attn_keep, mlp_keep = (cfg.attn_keep, cfg.mlp_keep) if separate else (cfg.width_keep, cfg.width_keep)
            if "attn" in cfg.searched:
                metric = compute_metric(self.model, space, cfg.init, calibration,
                                        keep_ratio=min(attn_keep, mlp_keep), seed=cfg.seed, progress=progress)
                scores = UnitScores(
                    torch.cat([scores_from_metric(metric.attn[space.attn_slice(i)], attn_keep, mapping,
                                                  cfg.init_confidence) for i in range(space.num_layers)]),
                    torch.cat([scores_from_metric(metric.mlp[space.mlp_slice(i)], mlp_keep, mapping,
                                                  cfg.init_confidence) for i in range(space.num_layers)]),
                )
            else:
                scores = UnitScores(torch.ones(space.num_attn_units), torch.ones(space.num_mlp_units))
            if BLOCK_TYPES[0] in cfg.searched:
                # Both blocks of a layer start from the layer's influence, so the least probable blocks
                # come in pairs and the start is ShortGPT's layer ranking; per-block influence measured
                # far worse (docs/results/depth_budget.md).
                influence = block_influence(self.model, space, calibration, progress=progress)
                scores.attn_blocks = scores_from_metric(influence.layer, cfg.width_keep, mapping, cfg.init_confidence)
                scores.mlp_blocks = scores.attn_blocks.clone()
            if not separate:
                costs, budget = cost_budget(space, cfg)
                scores = project_to_cost(scores, costs, space, budget, cfg.searched)
            self._init_scores = scores
        return self._init_scores

    def _initial_state(self, progress: bool) -> dict:
        cfg = self.config
        probs = self.initial_probabilities(progress)
        return {
            **{k: v.clone().float() for k, v in probs.as_dict().items()},
            "step": 0, "baseline": None, "nan_samples": 0,
            "generator": torch.Generator().manual_seed(cfg.seed).get_state(),
            "history": {"loss": [], "baseline": [], "lr": []},
        }

    def _signature(self) -> dict:
        return {
            "config": dataclasses.asdict(self.config) | {"checkpoint_every": None},
            "layers": [dataclasses.astuple(s) for s in self.space.layers],
            "num_batches": len(self.batches),
        }

    def _save_state(self, state: dict) -> None:
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint_path.with_name(self.checkpoint_path.name + ".tmp")
        torch.save({"signature": self._signature(), "state": state}, tmp)
        os.replace(tmp, self.checkpoint_path)

    def _load_state(self) -> dict:
        try:
            blob = torch.load(self.checkpoint_path, weights_only=False)
            signature, state = blob["signature"], blob["state"]
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
            raise ResumeError(f"cannot read search state {self.checkpoint_path}: {exc}. Delete it to start over.") from exc
        if signature != self._signature():
            raise ResumeError(
                f"search state {self.checkpoint_path} was written for another model, calibration set or "
                f"configuration; delete it or pass another checkpoint path"
            )
        return state

    # -- loop ------------------------------------------------------------------------------
    def _batch(self, step: int) -> dict[str, torch.Tensor]:
        n = len(self.batches)
        epoch, i = divmod(step, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed + 1000 * epoch))
        return self.batches[int(order[i])]

    @torch.no_grad()
    def run(self, progress: bool = True, on_step: Callable[[int, dict], None] | None = None) -> SearchResult:
        """Run (or resume) the search to ``config.steps`` and return the result."""
        cfg, space = self.config, self.space
        start = time.perf_counter()
        resumed = self.checkpoint_path is not None and self.checkpoint_path.exists()
        state = self._load_state() if resumed else self._initial_state(progress)
        if resumed:
            logger.info("resuming search from %s at step %d", self.checkpoint_path, state["step"])
        gen = torch.Generator()
        gen.set_state(state["generator"])
        pools = {"attn": None if cfg.global_budget else space.attn_offsets,
                 "mlp": None if cfg.global_budget else space.mlp_offsets}
        keep = {"attn": cfg.attn_keep, "mlp": cfg.mlp_keep}
        costs, budget = cost_budget(space, cfg) if cfg.cost is not None else (None, None)
        kinds = [k for k in WIDTH_TYPES + BLOCK_TYPES if k in state]
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        bar = tqdm(range(state["step"], cfg.steps), initial=state["step"], total=cfg.steps,
                   desc="policy-gradient search", disable=not progress)
        try:
            for step in bar:
                lr = _cosine_lr(cfg.lr, step, cfg.steps)
                antithetic = cfg.estimator == "antithetic"
                sampled = {k: sample_masks(state[k], cfg.samples_per_step, gen, antithetic) if k in cfg.searched
                           else torch.ones(cfg.samples_per_step, state[k].numel()) for k in kinds}
                batch = {k: v.to(device) for k, v in self._batch(step).items()}
                losses = sample_losses(self.model, space, batch, UnitMasks(**sampled),
                                       cfg.samples_in_one_forward, cfg.execution).cpu()  # [K]
                valid = usable_samples(losses, cfg.estimator)
                state["nan_samples"] += int((~valid).sum())
                if int(valid.sum()) >= 2:
                    losses = losses[valid]
                    mean_loss = float(losses.mean())
                    if cfg.baseline_window == 0:
                        baseline = 0.0
                    elif state["baseline"] is None:
                        baseline = mean_loss
                    else:
                        w = cfg.baseline_window
                        baseline = (1 - 1 / w) * state["baseline"] + mean_loss / w
                    state["baseline"] = baseline
                    stepped = {k: state[k] - lr * policy_gradient(cfg.estimator, losses, sampled[k][valid], state[k],
                                                                  baseline) if k in cfg.searched else state[k]
                               for k in kinds}
                    if costs is None:  # the paper's separate budgets, per type
                        stepped = {k: project_pools(v, keep[k], pools[k]) for k, v in stepped.items()}
                    else:
                        stepped = project_to_cost(UnitScores(**stepped), costs, space, budget, cfg.searched).as_dict()
                    state.update(stepped)
                    for key, value in (("loss", mean_loss), ("baseline", baseline), ("lr", lr)):
                        state["history"][key].append(value)
                    bar.set_postfix(loss=f"{mean_loss:.3f}", baseline=f"{baseline:.3f}")
                state["step"] = step + 1
                state["generator"] = gen.get_state()
                if self.checkpoint_path and (state["step"] % cfg.checkpoint_every == 0 or state["step"] == cfg.steps):
                    self._save_state(state)
                if on_step is not None:
                    on_step(step, state)
        finally:
            bar.close()
            self.model.train(was_training)
        if state["nan_samples"]:
            logger.warning("%d samples had a non-finite loss and were skipped", state["nan_samples"])
        probs = UnitScores(**{k: state[k] for k in kinds})
        return SearchResult(
            probs=probs, masks=hard_masks(probs, space, cfg), space=space, config=cfg,
            history=state["history"], nan_samples=state["nan_samples"], seconds=time.perf_counter() - start,
        )


def _as_batches(calibration, batch_size: int) -> list[dict[str, torch.Tensor]]:
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2:
            raise ValueError("calibration tokens must be a [N, T] tensor of token ids")
        n = calibration.shape[0] // batch_size
        if n == 0:
            raise ValueError(f"{calibration.shape[0]} calibration blocks are fewer than one batch of {batch_size}")
        return [{"input_ids": calibration[i * batch_size:(i + 1) * batch_size]} for i in range(n)]
    batches = [dict(b) for b in calibration]
    if not batches:
        raise ValueError("no calibration batches given")
    return batches
