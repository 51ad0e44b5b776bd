"""The policy-gradient search loop: forward passes only, under ``torch.no_grad()``.

One step (method.md §3–§6)::

    m_j ~ Bernoulli(s)                     j = 1..K, shared minibatch x
    L_j = CE(model masked by m_j; x)       NaN samples dropped and counted
    b   = EMA_W(mean_j L_j)                includes the current batch
    s  <- s - lr_t · 1/(K-1) Σ_j (L_j - b)(m_j - s)/sqrt(s(1-s))
    s  <- project(s) onto the budget       per unit type, globally or per layer; or one cost budget
    lr_t: cosine from lr to 0 over all steps

:meth:`PolicyGradientSearch.step` is these lines. The model is never modified: masks act through
hooks that are removed after every forward (``execution="gather"`` swaps in the kept weights for the
duration of one forward, core/subnetwork.py). The estimator is ``config.estimator``
(search/policy.py), the projection and the final mask are the search's
:class:`~pg_pruning_plugin.search.budget.Budget`.

Under a process group (core/distributed.py) every rank builds the search with the same model,
configuration and calibration (checked when :meth:`~PolicyGradientSearch.run` starts). The masks of
a step are drawn on every rank from the same generator; each rank scores its share of them on its
rows of the batch (:class:`~pg_pruning_plugin.core.distributed.StepSplit`), one all-reduce per step
gives every rank all ``K`` losses, and every rank applies the same update. The held-in checks split
their batches over the ranks, the initial metrics their calibration shards. Rank 0 alone reads and
writes the search-state file and shows the progress bar.
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
from tqdm.auto import tqdm

from ..core import distributed
from ..core.architectures import SearchSpace
from ..core.masking import masked
from ..core.modeling import IGNORE_INDEX, eval_mode, model_device, next_token_losses
from ..core.subnetwork import subnetwork
from ..core.units import UNIT_TYPES, UnitMasks, UnitValues
from ..refit.bias import bias_outputs, output_input_means
from . import state_file
from .budget import Budget
from .config import ResumeError, SearchConfig, SearchResult
from .init import initial_probabilities
from .interrupt import stop_after_step
from .objective import DenseTargets, dense_targets, sequence_losses
from .policy import ema_baseline, policy_gradient, sample_unit_masks, threshold_band, usable_samples

__all__ = ["PolicyGradientSearch", "SearchState", "sample_losses"]

logger = logging.getLogger(__name__)


def sample_losses(model: nn.Module, space: SearchSpace, batch: dict[str, torch.Tensor], masks: UnitMasks,
                  one_forward: bool = True, execution: str = "mask") -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch`` under each mask sample: ``[S]``.

    ``execution="gather"`` runs each sample's sub-network (one forward per sample).
    """
    masks = masks.folded(space)
    if masks.num_samples > 1 and (not one_forward or execution == "gather"):
        return torch.cat([sample_losses(model, space, batch, masks.sample(j).as_masks(), execution=execution)
                          for j in range(masks.num_samples)])
    s = masks.num_samples
    ids = batch["input_ids"].repeat(s, 1)  # [S·B, T], sample-major
    attention_mask = batch.get("attention_mask")
    labels = ids if attention_mask is None else ids.masked_fill(attention_mask.repeat(s, 1) == 0, IGNORE_INDEX)
    with (subnetwork if execution == "gather" else masked)(model, space, masks):
        logits = model(
            input_ids=ids, attention_mask=None if attention_mask is None else attention_mask.repeat(s, 1),
            use_cache=False,
        ).logits
    ce = next_token_losses(logits, labels)  # [S·B, T-1]
    valid = (labels[:, 1:] != IGNORE_INDEX).view(s, -1).sum(1)
    return ce.view(s, -1).sum(1) / valid.clamp_min(1)


def _cosine_lr(lr: float, step: int, total: int) -> float:
    return lr * 0.5 * (1.0 + math.cos(math.pi * step / total))


@dataclass
class SearchState:
    """Everything a search carries from one step to the next (and writes to its state file)."""

    probs: UnitValues
    generator: torch.Generator
    step: int = 0
    baseline: float | None = None
    nan_samples: int = 0
    history: dict[str, list[float]] = field(default_factory=lambda: {"loss": [], "baseline": [], "lr": []})
    incumbent: UnitValues | None = None  # probabilities whose hard mask scored best on the held-in blocks
    incumbent_loss: float = math.inf

    def to_dict(self) -> dict:
        """Plain tensors and numbers (``torch.save``-able)."""
        return {**self.probs.as_dict(), "step": self.step, "baseline": self.baseline,
                "nan_samples": self.nan_samples, "generator": self.generator.get_state(), "history": self.history,
                "incumbent": None if self.incumbent is None else self.incumbent.as_dict(),
                "incumbent_loss": self.incumbent_loss}

    @classmethod
    def from_dict(cls, state: dict) -> SearchState:
        generator = torch.Generator()
        generator.set_state(state["generator"])
        incumbent = state.get("incumbent")
        return cls(UnitValues(**{k: state[k] for k in UNIT_TYPES if k in state}), generator, state["step"],
                   state["baseline"], state["nan_samples"], state["history"],
                   None if incumbent is None else UnitValues(**incumbent), state.get("incumbent_loss", math.inf))


class PolicyGradientSearch:
    """Learn which KV groups and MLP channels (and blocks) of ``model`` to keep.

    ``calibration`` holds token blocks ``[N, T]`` (or a list of batch dicts with ``input_ids`` and
    an optional ``attention_mask``). ``checkpoint_path`` enables atomic search-state snapshots
    every ``config.checkpoint_every`` steps; an existing file there is resumed from.
    ``init_scores`` replaces the initial probabilities (search/init.py; units policy).

    ``config.policy`` picks the policy: ``"allocation"`` builds an
    :class:`~pg_pruning_plugin.search.allocation_search.AllocationSearch` (a subclass), ``"units"`` this
    class, the paper's per-unit Bernoulli search. With ``config.incumbent_every`` the last
    ``config.held_in_blocks`` calibration blocks are kept out of the steps for the incumbent check.

    >>> search = PolicyGradientSearch(model, blocks, SearchConfig(sparsity=0.3, steps=200))
    >>> result = search.run()          # result.probs, result.masks
    >>> small = prune_model(model, result.masks)   # pg_pruning_plugin.core.removal
    """

    state_class: type = SearchState  # what run() carries between steps and writes to the state file

    def __new__(cls, model: nn.Module, calibration, config: SearchConfig | None = None, *args, **kwargs):
        if cls is PolicyGradientSearch and (config or SearchConfig()).policy == "allocation":
            from .allocation_search import AllocationSearch

            cls = AllocationSearch
        return super().__new__(cls)

    def __init__(
        self,
        model: nn.Module,
        calibration: torch.Tensor | list[dict[str, torch.Tensor]],
        config: SearchConfig | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        init_scores: UnitValues | None = None,
    ):
        self.model = model
        self.config = config or SearchConfig()
        self.space = SearchSpace.from_model(model)
        if self.space.has_removed_blocks:
            raise ValueError("the model already has removed blocks; run the search on the unpruned model")
        self.budget = Budget.of(self.space, self.config)  # refuses an unreachable budget before any work
        self.batches = _as_batches(calibration, self.config.batch_size)
        held = self.config.held_in_blocks // self.config.batch_size if self.config.incumbent_every else 0
        if held and len(self.batches) <= held:
            raise ValueError(f"{len(self.batches)} calibration batches leave none for the steps after the "
                             f"{held} held-in batches ({self.config.held_in_blocks} blocks): give more calibration "
                             f"text or a smaller held_in_blocks")
        self.held_in = list(range(len(self.batches) - held, len(self.batches)))  # batch indices, never stepped on
        self.train = list(range(len(self.batches) - held))
        needed = self.config.steps
        available = len(self.train) * self.config.max_epochs
        if self.config.max_epochs and available < needed:
            raise ValueError(
                f"{len(self.train)} calibration batches of {self.config.batch_size} x "
                f"{self.batches[0]['input_ids'].shape[1]} tokens allow {available} steps with "
                f"max_epochs={self.config.max_epochs}, but steps={needed}: give more calibration text, fewer "
                f"steps, a smaller batch or a larger max_epochs"
            )
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self._init_scores = init_scores
        # how the candidates and rows of a step are divided over the ranks (one rank: all of them)
        self.split = distributed.StepSplit.of(self._candidates_per_step(), self.config.batch_size)

    def _candidates_per_step(self) -> int:
        """Losses a step computes on its batch: the ``K`` mask samples."""
        return self.config.samples_per_step

    # -- state -----------------------------------------------------------------------------
    def initial_probabilities(self, progress: bool = True) -> UnitValues:
        """Keep-probabilities the search starts from: ``init_scores`` or the mapped init metrics."""
        if self._init_scores is None:
            calibration = [b["input_ids"] for b in self.batches[: self.config.init_batches]]
            self._init_scores = initial_probabilities(self.model, self.space, calibration, self.config, self.budget,
                                                      progress)
        return self._init_scores

    def _initial_state(self, progress: bool) -> SearchState:
        self._setup(progress)
        probs = self.initial_probabilities(progress).map(lambda v: v.clone().float())
        state = SearchState(probs, torch.Generator().manual_seed(self.config.seed))
        if self.held_in:  # the start is the first incumbent: the search never returns worse on held-in text
            state.incumbent, state.incumbent_loss = probs.map(torch.clone), self._held_in_loss(probs)
        return state

    def _signature(self) -> dict:
        return state_file.signature(self.config, self.space, len(self.batches))

    def _save_state(self, state: SearchState) -> None:
        """Rank 0 writes the state file (with how the run was split over ranks); every rank first checks that
        all ranks hold the same state."""
        distributed.check_consistent(f"the search state after step {state.step}", state=state.to_dict())
        if distributed.is_main():
            state_file.write_state(self.checkpoint_path, self._signature(),
                                   state.to_dict() | {"parallel": self.split.as_dict()},
                                   seconds=time.perf_counter() - self._clock)

    def _read_state(self) -> state_file.SavedState | None:
        """The search-state file to resume from, read by rank 0 and handed to every rank (None: start anew)."""
        path = self.checkpoint_path
        return distributed.from_main(lambda: state_file.read_state(path) if path and path.exists() else None,
                                     f"search-state file {path}")

    def _load_state(self, saved: state_file.SavedState) -> SearchState:
        state_file.check_signature(saved, self._signature(), self.checkpoint_path)
        _log_resumed_split(saved.state.get("parallel"), self.split)
        try:
            state = self.state_class.from_dict(saved.state)
        except Exception as exc:  # noqa: BLE001 - any unreadable state is reported the same way
            raise ResumeError(f"cannot read search state {self.checkpoint_path}: {exc}; delete it to start "
                              f"over") from exc
        self._clock -= saved.seconds  # the result's seconds include the run before the interruption
        self._setup(progress=distributed.is_main())
        return state

    # -- loop ------------------------------------------------------------------------------
    def _train_batch(self, step: int) -> int:
        """Index of the batch of ``step``: the training batches in a fresh seeded order every epoch."""
        n = len(self.train)
        epoch, i = divmod(step, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed + 1000 * epoch))
        return self.train[int(order[i])]

    def _on_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(model_device(self.model)) for k, v in batch.items()}

    def _batch(self, step: int) -> dict[str, torch.Tensor]:
        return self._on_device(self.batches[self._train_batch(step)])

    def _setup(self, progress: bool) -> None:
        """What the losses need besides the model: the dense targets of ``loss="kl"`` and the dense input
        means of ``loop_refit="bias"`` (computed once, on the unmasked model)."""
        if getattr(self, "_prepared", False):
            return
        cfg = self.config
        self.targets = self._dense_targets()
        self.input_means = None
        if cfg.loop_refit == "bias":
            self.input_means = output_input_means(self.model, self.space, [
                self.batches[i] for i in self.train[: cfg.init_batches]])
        self._prepared = True

    def _own_held_in(self) -> list[int]:
        """The held-in batches whose loss this rank computes (all of them in one process)."""
        own = distributed.split(len(self.held_in))
        return self.held_in[own.start:own.stop]

    def _scored_rows(self, b: int) -> range:
        """The rows of batch ``b`` this rank ever scores: its step share of a training batch, all rows of one
        of its held-in batches, none of another rank's."""
        n = self.batches[b]["input_ids"].shape[0]
        if b in self.held_in:
            return range(n) if b in self._own_held_in() else range(0)
        return self.split.rows(n)

    def _dense_targets(self) -> list[DenseTargets | None]:
        """The dense model's targets (``loss="kl"``) of the rows each batch is scored on by this rank, per batch
        (None where it scores none, and for ``loss="ce"``)."""
        targets: list[DenseTargets | None] = [None] * len(self.batches)
        if self.config.loss != "kl":
            return targets
        parts = {b: self._scored_rows(b) for b in range(len(self.batches))}
        parts = {b: rows for b, rows in parts.items() if len(rows)}
        with eval_mode(self.model):
            computed = dense_targets(self.model, [_rows(self.batches[b], rows) for b, rows in parts.items()],
                                     self.config.kl_top_k)
        for b, target in zip(parts, computed):
            targets[b] = target
        return targets

    def _loss_weight(self, batch: dict[str, torch.Tensor]) -> float:
        """What a loss on ``batch`` (some rows of a step's batch) weighs in the mean over the ranks' rows: its
        scored tokens for the paper's loss (the mean over every token of the batch), else its sequences (the
        mean over sequences)."""
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        if self.config.loss == "ce" and self.input_means is None:
            return float(ids.shape[0] * (ids.shape[1] - 1) if mask is None else int((mask[:, 1:] != 0).sum()))
        return float(ids.shape[0])

    @torch.no_grad()
    def sample_losses(self, batch: dict[str, torch.Tensor], masks: UnitMasks,
                      target: DenseTargets | None = None) -> torch.Tensor:
        """``[K]`` losses of ``batch`` under the ``K`` mask samples (on the CPU).

        Under a process group this rank scores its share of the samples on its rows of ``batch``
        (``self.split``; ``target`` holds the dense targets of those rows) and the shares are gathered,
        so every rank returns all ``K`` losses.
        """
        if self.split.world_size == 1:
            return self._losses(batch, masks, target)
        own, rows = self.split.samples(masks.num_samples), self.split.rows(batch["input_ids"].shape[0])
        if not len(rows):
            own = range(own.start, own.start)
        values, weights = torch.zeros(0), torch.zeros(0)
        if len(own):
            part = _rows(batch, rows)
            values = self._losses(part, UnitMasks(**{k: v[own.start:own.stop] for k, v in masks.as_dict().items()}),
                                  target)
            weights = torch.full((len(own),), self._loss_weight(part), dtype=torch.float64)
        return distributed.gather_losses(values, own, masks.num_samples, weights).float()

    def _losses(self, batch: dict[str, torch.Tensor], masks: UnitMasks,
                target: DenseTargets | None = None) -> torch.Tensor:
        """``[S]`` losses of ``batch`` under the ``S`` mask samples, computed here (on the CPU)."""
        cfg = self.config
        if cfg.loss == "ce" and self.input_means is None:  # the paper's loss: one [K·B, T] forward (mask)
            return sample_losses(self.model, self.space, batch, masks, cfg.samples_in_one_forward,
                                 cfg.execution).cpu()
        out = []
        for j in range(masks.num_samples):
            sample = masks.sample(j)
            outputs = None if self.input_means is None else bias_outputs(self.model, self.space, sample,
                                                                          self.input_means)
            context = subnetwork(self.model, self.space, sample, outputs) if cfg.execution == "gather" \
                else masked(self.model, self.space, sample)
            with context:
                logits = self.model(**batch, use_cache=False).logits
            out.append(sequence_losses(logits, batch, cfg.loss, target).mean())
        return torch.stack(out).float().cpu()

    @torch.no_grad()
    def _held_in_loss(self, probs: UnitValues) -> float:
        """Mean loss of the hard mask of ``probs`` on the held-in blocks (the batches split over the ranks)."""
        mask = self.budget.hard_mask(probs).as_masks()
        mine = torch.tensor([float(self._losses(self._on_device(self.batches[b]), mask, self.targets[b])[0])
                             for b in self._own_held_in()], dtype=torch.float64)
        losses = distributed.gather_losses(mine, distributed.split(len(self.held_in)), len(self.held_in)).tolist()
        return sum(losses) / len(losses)

    @torch.no_grad()
    def step(self, state: SearchState) -> float | None:
        """One policy-gradient step on ``state`` (module docstring); returns the mean sample loss, or None
        for a step with fewer than two finite losses, which makes no update."""
        cfg = self.config
        lr = _cosine_lr(cfg.lr, state.step, cfg.steps)
        masks = sample_unit_masks(state.probs, self.budget.searched, cfg.samples_per_step, state.generator,
                                  cfg.estimator)
        band = None
        if cfg.band:
            hard = self.budget.hard_mask(state.probs)
            band = threshold_band(state.probs, hard, self.space, cfg.band)
            masks = UnitMasks(**{k: torch.where(band.as_dict()[k].bool(), m, hard.as_dict()[k])
                                 if k in band.as_dict() else m for k, m in masks.as_dict().items()})
        index = self._train_batch(state.step)
        losses = self.sample_losses(self._on_device(self.batches[index]), masks, self.targets[index])
        ok = usable_samples(losses, cfg.estimator)
        state.nan_samples += int((~ok).sum())
        state.step += 1
        if int(ok.sum()) < 2:
            return None
        losses, sampled = losses[ok], masks.as_dict()
        mean_loss = float(losses.mean())
        state.baseline = ema_baseline(state.baseline, mean_loss, cfg.baseline_window)
        grads = {k: policy_gradient(cfg.estimator, losses, sampled[k][ok], getattr(state.probs, k), state.baseline)
                 for k in self.budget.searched}
        if band is not None:  # units outside the band were not sampled: no information about them
            grads = {k: g * band.as_dict()[k] if k in band.as_dict() else g for k, g in grads.items()}
        state.probs = self.budget.project(state.probs.stepped(grads, lr))
        for key, value in (("loss", mean_loss), ("baseline", state.baseline), ("lr", lr)):
            state.history[key].append(value)
        if self.held_in and state.step % cfg.incumbent_every == 0:
            self._check_incumbent(state)
        return mean_loss

    def _check_incumbent(self, state: SearchState) -> None:
        held = self._held_in_loss(state.probs)
        state.history.setdefault("held_in", []).append(held)
        if held < state.incumbent_loss:
            state.incumbent, state.incumbent_loss = state.probs.map(torch.clone), held

    @torch.no_grad()
    def run(self, progress: bool = True, on_step: Callable[[int, SearchState], None] | None = None) -> SearchResult:
        """Run (or resume) the search to ``config.steps`` and return the result.

        ``on_step(step, state)`` is called after every step (``state.step == step + 1``). Ctrl-C (SIGINT)
        lets the step under way finish, saves its state (with a ``checkpoint_path``) and raises
        ``KeyboardInterrupt``; a second Ctrl-C raises at once (search/interrupt.py). Under a process
        group every rank calls this; ranks that disagree on the model's shapes, the configuration or the
        calibration are refused first (:class:`~pg_pruning_plugin.core.distributed.DistributedError`), and
        only rank 0 shows progress.
        """
        cfg = self.config
        progress = progress and distributed.is_main()
        self._check_ranks()
        self._clock = time.perf_counter()  # moved back by a resumed state's seconds
        saved = self._read_state()
        state = self._load_state(saved) if saved is not None else self._initial_state(progress)
        if saved is not None:
            logger.info("resuming search from %s at step %d", self.checkpoint_path, state.step)
        bar = tqdm(range(state.step, cfg.steps), initial=state.step, total=cfg.steps,
                   desc="policy-gradient search", disable=not progress)
        with eval_mode(self.model), stop_after_step() as stop_requested:
            try:
                for step in bar:
                    mean_loss = self.step(state)
                    if mean_loss is not None:
                        bar.set_postfix(self._postfix(state, mean_loss))
                    due = state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps
                    if self.checkpoint_path and due:
                        self._save_state(state)
                    if on_step is not None:
                        on_step(step, state)
                    if stop_requested():
                        if self.checkpoint_path and not due:
                            self._save_state(state)
                        logger.info("interrupted: stopped after step %d of %d", state.step, cfg.steps)
                        raise KeyboardInterrupt
            finally:
                bar.close()
        if state.nan_samples and distributed.is_main():
            logger.warning("%d samples had a non-finite loss and were skipped", state.nan_samples)
        result = self._result(state, time.perf_counter() - self._clock)
        distributed.check_consistent("the search result", masks=result.masks.as_dict())
        return result

    def _check_ranks(self) -> None:
        """Refuse ranks that would not compute the same search; log how the steps are split."""
        if not distributed.is_distributed():
            return
        distributed.check_consistent(
            "the search", config=dataclasses.asdict(self.config), weights=distributed.weight_shapes(self.model),
            calibration=self.batches, init_scores=None if self._init_scores is None else self._init_scores.as_dict())
        if distributed.is_main():
            logger.info("distributed search: %s", self.split.describe())

    def _postfix(self, state: SearchState, loss: float) -> dict[str, str]:
        """What the progress bar shows after a step."""
        return {"loss": f"{loss:.3f}", "baseline": f"{state.baseline:.3f}"}

    def _result(self, state: SearchState, seconds: float) -> SearchResult:
        """The search's answer from its final state (with an incumbent: the better of it and the final state)."""
        probs = state.probs
        if self.held_in and state.incumbent is not None and state.incumbent_loss < self._held_in_loss(state.probs):
            probs = state.incumbent
        return SearchResult(
            probs=probs, masks=self.budget.hard_mask(probs), space=self.space, config=self.config,
            history=state.history, nan_samples=state.nan_samples, seconds=seconds,
        )


def _rows(batch: dict[str, torch.Tensor], rows: range) -> dict[str, torch.Tensor]:
    """Rows ``rows`` of every tensor of ``batch``."""
    return {k: v[rows.start:rows.stop] for k, v in batch.items()}


def _log_resumed_split(saved: dict | None, split: distributed.StepSplit) -> None:
    """Say whether a state written under another split of the steps resumes exactly: it does when neither run
    divided the batch's rows (every loss is then computed as one process computes it)."""
    saved = saved or {"world_size": 1, "data_shards": 1}
    if saved["world_size"] == split.world_size and saved["data_shards"] == split.data_shards:
        return
    if saved["data_shards"] == split.data_shards == 1:
        logger.info("the state was written by %d rank(s), resumed by %d: neither divides a batch's rows, so the run "
                    "continues exactly as an uninterrupted one", saved["world_size"], split.world_size)
    else:
        logger.warning("the state was written by %d rank(s) with each batch in %d shard(s), resumed by %d with %d: "
                       "the losses are summed in another order, so the result equals an uninterrupted run's up to "
                       "float rounding (the masks differ only where that rounding decides a tie)",
                       saved["world_size"], saved["data_shards"], split.world_size, split.data_shards)


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
