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

from .architectures import ARCHITECTURES, LayerShape, SearchSpace
from .masking import UnitMasks, masked
from .metrics import METRICS, UnitScores, compute_metric
from .policy import (ESTIMATORS, INIT_MAPPINGS, MASK_RULES, policy_gradient, project_pools, sample_masks,
                     scores_from_metric, top_k_mask, usable_samples)
from .subnetwork import subnetwork

__all__ = ["PolicyGradientSearch", "ResumeError", "SearchConfig", "SearchResult"]

logger = logging.getLogger(__name__)

EXECUTIONS = ("mask", "gather")  # masking.masked / subnetwork.subnetwork


class ResumeError(ValueError):
    """A search-state file that is corrupt or belongs to another model or configuration."""


@dataclass
class SearchConfig:
    """Everything that defines a search. Defaults: the authors' LLaMA-2-7B run (method.md §9).

    Sparsities are fractions of units *removed*; ``attn_sparsity``/``mlp_sparsity`` default to
    ``sparsity`` (the paper's separate budgets with one ratio).
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

    def __post_init__(self) -> None:
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
            "probs": {"attn": self.probs.attn, "mlp": self.probs.mlp},
            "masks": {"attn": self.masks.attn, "mlp": self.masks.mlp},
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
        """(kept KV groups, kept MLP channels) of every layer."""
        return [
            (int(self.masks.attn[self.space.attn_slice(i)].sum()), int(self.masks.mlp[self.space.mlp_slice(i)].sum()))
            for i in range(self.space.num_layers)
        ]


def hard_masks(probs: UnitScores, space: SearchSpace, config: SearchConfig) -> UnitScores:
    """Hard masks of the keep-probabilities per unit type (``config.mask_rule``), ≥ 1 unit per layer."""
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
        """Keep-probabilities the search starts from: ``init_scores`` or the mapped init metric."""
        if self._init_scores is None:
            cfg = self.config
            metric = compute_metric(
                self.model, self.space, cfg.init,
                [b["input_ids"] for b in self.batches[: cfg.init_batches]],
                keep_ratio=min(cfg.attn_keep, cfg.mlp_keep), seed=cfg.seed, progress=progress,
            )
            mapping = "const" if cfg.init == "constant" else cfg.init_mapping
            self._init_scores = UnitScores(
                torch.cat([scores_from_metric(metric.attn[self.space.attn_slice(i)], cfg.attn_keep, mapping,
                                              cfg.init_confidence)
                           for i in range(self.space.num_layers)]),
                torch.cat([scores_from_metric(metric.mlp[self.space.mlp_slice(i)], cfg.mlp_keep, mapping,
                                              cfg.init_confidence)
                           for i in range(self.space.num_layers)]),
            )
        return self._init_scores

    def _initial_state(self, progress: bool) -> dict:
        cfg = self.config
        probs = self.initial_probabilities(progress)
        return {
            "attn": probs.attn.clone().float(), "mlp": probs.mlp.clone().float(),
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
        attn_pools = None if cfg.global_budget else space.attn_offsets
        mlp_pools = None if cfg.global_budget else space.mlp_offsets
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        bar = tqdm(range(state["step"], cfg.steps), initial=state["step"], total=cfg.steps,
                   desc="policy-gradient search", disable=not progress)
        try:
            for step in bar:
                lr = _cosine_lr(cfg.lr, step, cfg.steps)
                antithetic = cfg.estimator == "antithetic"
                m_attn = sample_masks(state["attn"], cfg.samples_per_step, gen, antithetic)
                m_mlp = sample_masks(state["mlp"], cfg.samples_per_step, gen, antithetic)
                batch = {k: v.to(device) for k, v in self._batch(step).items()}
                losses = sample_losses(self.model, space, batch, UnitMasks(m_attn, m_mlp),
                                       cfg.samples_in_one_forward, cfg.execution).cpu()  # [K]
                valid = usable_samples(losses, cfg.estimator)
                state["nan_samples"] += int((~valid).sum())
                if int(valid.sum()) >= 2:
                    losses, m_attn, m_mlp = losses[valid], m_attn[valid], m_mlp[valid]
                    mean_loss = float(losses.mean())
                    if cfg.baseline_window == 0:
                        baseline = 0.0
                    elif state["baseline"] is None:
                        baseline = mean_loss
                    else:
                        w = cfg.baseline_window
                        baseline = (1 - 1 / w) * state["baseline"] + mean_loss / w
                    state["baseline"] = baseline
                    state["attn"] = project_pools(
                        state["attn"] - lr * policy_gradient(cfg.estimator, losses, m_attn, state["attn"], baseline),
                        cfg.attn_keep, attn_pools)
                    state["mlp"] = project_pools(
                        state["mlp"] - lr * policy_gradient(cfg.estimator, losses, m_mlp, state["mlp"], baseline),
                        cfg.mlp_keep, mlp_pools)
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
        probs = UnitScores(state["attn"], state["mlp"])
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
