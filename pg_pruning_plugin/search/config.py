"""What defines a search (:class:`SearchConfig`) and what it returns (:class:`SearchResult`)."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

import torch

from ..core.architectures import ARCHITECTURES, LayerShape, SearchSpace
from ..core.removal import kept_space
from ..core.selection import MASK_RULES
from ..core.units import UnitValues
from ..resources.files import atomic_file
from ..scoring.metrics import METRICS
from .budget import searched_types
from .costs import COSTS, check_custom_costs
from .init import INIT_MAPPINGS
from .levels import LOOP_REFITS, RANKINGS
from .objective import LOSSES
from .policy import ESTIMATORS

__all__ = ["EXECUTIONS", "POLICIES", "PRESETS", "ResumeError", "SearchConfig", "SearchResult"]

EXECUTIONS = ("mask", "gather")  # core.masking.masked / core.subnetwork.subnetwork
# allocation: per-layer widths, policy gradient over level transfers (search/allocation_search.py);
# units: the paper's Bernoulli keep-probability per KV group and MLP channel (search/loop.py).
POLICIES = ("allocation", "units")

# Named bundles of defaults. A field left at ``None`` takes its preset's value; an explicit value wins.
# "allocation": the configuration that wins the comparisons of docs/results/quality.md; "authors": the paper's
# LLaMA-2-7B run as the authors' code computes it (method.md §9).
PRESETS: dict[str, dict[str, object]] = {  # each preset names its policy; POLICY_PRESETS maps back
    "allocation": {"policy": "allocation", "steps": 100, "samples_per_step": 4, "lr": 20.0, "loss": "kl",
                   "incumbent_every": 5, "execution": "gather", "max_epochs": 0, "loop_refit": "lstsq"},
    "authors": {"policy": "units", "steps": 15000, "samples_per_step": 2, "lr": 2e-3, "loss": "ce",
                "incumbent_every": 0, "execution": "mask", "max_epochs": 1, "loop_refit": "none"},
}
POLICY_PRESETS = {"allocation": "allocation", "units": "authors"}  # the defaults of a policy given explicitly


class ResumeError(ValueError):
    """A search-state file that is corrupt or belongs to another model or configuration."""


@dataclass
class SearchConfig:
    """Everything that defines a search; ``preset`` fills every field left at ``None`` (:data:`PRESETS`).

    ``preset="allocation"`` is the allocation search: one integer per layer and unit type
    (kept KV groups, kept MLP blocks of ``block_size`` channels) learned by policy gradient over
    budget-neutral level transfers, units ranked inside each layer by ``ranking``, candidates scored
    with ``loop_refit`` weights by ``loss`` on the same batch, and the best allocation on
    ``held_in_blocks`` calibration blocks (checked every ``incumbent_every`` steps) returned. Its budget
    is always one budget in ``cost`` (default: prunable parameters), ``sparsity`` the fraction removed.
    ``lr`` is the step size of the transfer policy's logits there. ``preset="authors"`` is the paper's
    per-unit Bernoulli search (``policy="units"``) as the authors' code computes it.

    Under ``policy="units"``: sparsities are fractions of units *removed*; ``attn_sparsity``/``mlp_sparsity`` default to
    ``sparsity`` (the paper's separate budgets with one ratio). With a ``cost`` there is one budget
    instead: ``sparsity`` is the fraction of the prunable cost (q/k/v/o/gate/up/down parameters, or
    their forward FLOPs per token at ``cost_seq_len``) removed. ``granularity`` other than ``width``
    searches whole attention/MLP blocks too and always uses one budget (``cost`` defaults to params).
    ``keep_params`` gives that one parameter budget as the number of parameters left in the whole
    model (``cost`` params; ``sparsity`` is then not read): the search's
    :class:`~pg_pruning_plugin.search.budget.Budget` turns it into the fraction removed.
    """

    sparsity: float = 0.3
    attn_sparsity: float | None = None
    mlp_sparsity: float | None = None
    global_budget: bool = True  # heterogeneous widths; False = the same keep rate in every layer
    preset: str = "allocation"  # PRESETS: fills the fields left at None
    policy: str | None = None  # POLICIES
    steps: int | None = None
    samples_per_step: int | None = None  # K
    lr: float | None = None
    baseline_window: int = 5  # W; 0 disables the baseline (plain REINFORCE; units policy)
    batch_size: int = 8
    max_epochs: int | None = None  # passes allowed over the calibration blocks; 0: no limit
    loss: str | None = None  # LOSSES: next-token cross-entropy, or KL to the dense model (top kl_top_k)
    kl_top_k: int = 64
    incumbent_every: int | None = None  # steps between held-in checks of the deployed mask; 0: none
    held_in_blocks: int = 32  # calibration blocks kept out of the steps for the incumbent check
    block_size: int = 64  # allocation: MLP channels per level
    level_band: int = 8  # allocation: MLP levels on each side of the reference with candidate weights
    ranking: str = "obs"  # allocation: unit order inside a layer (RANKINGS)
    loop_refit: str | None = None  # weights a candidate is scored with (LOOP_REFITS; units: none | bias)
    band: float | None = None  # units: sample only this fraction of a layer's units on each side of its threshold
    refit_damping: float = 0.01  # λ of the least-squares fits, a fraction of the mean diagonal of H
    init: str = "wanda-sp"
    init_mapping: str = "sigmap"  # search.init.INIT_MAPPINGS
    init_confidence: float = 0.9  # keep-probability of init-mask units under init_mapping="mask"
    init_batches: int = 16  # calibration batches used by activation metrics
    round_to: int | None = None  # kept MLP widths rounded to the nearest multiple
    seed: int = 42
    checkpoint_every: int = 100
    samples_in_one_forward: bool = True  # evaluate the K samples as one [K·B, T] batch
    mask_rule: str = "topk"  # final mask: global top-k (paper) or per-layer expected width, core.selection.MASK_RULES
    estimator: str = "authors"  # a key of search.policy.ESTIMATORS: authors | loo | antithetic
    execution: str | None = None  # mask: zero dropped units; gather: skip them, one forward per sample
    granularity: str = "width"  # search.budget.GRANULARITIES: width | depth | width+depth
    cost: str | None = None  # None: separate budgets per unit type (paper); params | flops | custom: one budget
    cost_seq_len: int = 2048  # context length of the FLOPs cost
    custom_costs: dict[str, float] | None = None  # cost="custom": {"attn": per KV group, "mlp": per channel}
    keep_params: int | None = None  # one parameter budget as the parameters left in the whole model

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.policy is not None and self.policy not in POLICIES:
            raise ValueError(f"policy={self.policy!r}; choose one of {', '.join(POLICIES)}")
        defaults = PRESETS[self.preset]
        if self.policy is not None and self.policy != defaults["policy"]:  # e.g. policy="units" alone
            defaults = PRESETS[POLICY_PRESETS[self.policy]]
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.kl_top_k < 1:
            raise ValueError("kl_top_k must be a positive number of tokens")
        if self.incumbent_every < 0 or self.held_in_blocks < 0:
            raise ValueError("incumbent_every and held_in_blocks must be >= 0 (0 disables the incumbent)")
        if self.incumbent_every and self.held_in_blocks < self.batch_size:
            raise ValueError(f"the incumbent check needs held_in_blocks >= batch_size ({self.batch_size}); got "
                             f"{self.held_in_blocks}")
        if self.policy == "allocation":
            self._check_allocation()
        else:
            self._check_units()
        searched_types(self.granularity)  # validates the name
        if self.keep_params is not None:
            if isinstance(self.keep_params, bool) or not isinstance(self.keep_params, int) or self.keep_params < 1:
                raise ValueError(f"keep_params={self.keep_params!r} must be a positive number of parameters")
            if self.cost not in (None, "params"):
                raise ValueError(f"keep_params is a parameter budget; it cannot be combined with cost={self.cost!r}")
            self.cost = "params"
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
        if self.steps < 1 or self.batch_size < 1 or self.max_epochs < 0:
            raise ValueError("steps and batch_size must be positive, max_epochs >= 0 (0: no limit)")
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
        if ESTIMATORS[self.estimator].antithetic and self.samples_per_step % 2:
            raise ValueError(f"the {self.estimator} estimator needs an even samples_per_step (pairs u, 1-u)")
        if self.execution not in EXECUTIONS:
            raise ValueError(f"execution={self.execution!r}; choose one of {', '.join(EXECUTIONS)}")

    def _check_units(self) -> None:
        """The per-unit levers: a band around each layer's threshold, candidates scored with FLAP's bias."""
        if self.band is not None and not 0.0 < self.band < 0.5:
            raise ValueError(f"band={self.band} must be in (0, 0.5): the fraction of a layer's units sampled on "
                             f"each side of its threshold")
        if self.loop_refit not in ("none", "bias"):
            raise ValueError(f"loop_refit={self.loop_refit!r}: the units policy scores samples with 'none' or 'bias' "
                             f"(a least-squares fit per sample would cost a calibration pass each)")
        if self.loop_refit == "bias" and self.execution != "gather":
            raise ValueError("loop_refit='bias' adds output biases inside sub-network execution: "
                             "use execution='gather'")

    def _check_allocation(self) -> None:
        """The allocation policy's settings; its budget is one cost budget (parameters unless ``cost`` says)."""
        if self.granularity != "width":
            raise ValueError("the allocation policy searches widths; whole blocks need policy='units' "
                             "(preset='authors' or policy='units' with granularity depth / width+depth)")
        if self.attn_sparsity is not None or self.mlp_sparsity is not None or not self.global_budget:
            raise ValueError("the allocation policy has one budget over all layers and unit types: give sparsity "
                             "(or keep_params), not attn_sparsity/mlp_sparsity or global_budget=False; for the same "
                             "widths in every layer (a stock checkpoint) use preset='authors' with global_budget=False")
        if self.cost is None:
            self.cost = "params"
        if self.execution != "gather":
            raise ValueError("the allocation policy scores candidates as sub-networks: execution must be 'gather'")
        if self.samples_per_step < 2:
            raise ValueError("samples_per_step must be >= 2 (the policy update centres the K advantages)")
        if self.band is not None:
            raise ValueError("band applies to the units policy; the allocation policy always samples next to its "
                             "current widths")
        if self.ranking not in RANKINGS:
            raise ValueError(f"ranking={self.ranking!r}; choose one of {', '.join(RANKINGS)}")
        if self.loop_refit not in LOOP_REFITS:
            raise ValueError(f"loop_refit={self.loop_refit!r}; choose one of {', '.join(LOOP_REFITS)}")
        if self.block_size < 1 or self.level_band < 1:
            raise ValueError("block_size and level_band must be positive")
        if not (math.isfinite(self.refit_damping) and self.refit_damping > 0):
            raise ValueError("refit_damping must be a positive fraction of the mean diagonal of H (e.g. 0.01)")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError("lr must be positive")


@dataclass
class SearchResult:
    """Learned keep-probabilities, the hard masks derived from them, and the loss trace."""

    probs: UnitValues
    masks: UnitValues  # 0/1
    space: SearchSpace
    config: SearchConfig
    history: dict[str, list[float]] = field(default_factory=dict)
    nan_samples: int = 0
    seconds: float = 0.0
    levels: torch.Tensor | None = None  # allocation policy: [L, 2] kept KV groups and MLP blocks per layer

    def save(self, path: str | os.PathLike) -> None:
        """Write probabilities, masks, config and layer shapes (tensors and plain data only), atomically."""
        blob = {
            "probs": self.probs.as_dict(),
            "masks": self.masks.as_dict(),
            "config": dataclasses.asdict(self.config),
            "layers": [dataclasses.astuple(s) for s in self.space.layers],
            "model_type": self.space.model_type,
            "hidden_size": self.space.hidden_size,
            "fixed_parameters": self.space.fixed_parameters,
            "history": self.history, "nan_samples": self.nan_samples, "seconds": self.seconds,
            "levels": self.levels,
        }
        with atomic_file(path) as tmp:
            torch.save(blob, tmp)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SearchResult:
        """Read a file written by :meth:`save`."""
        blob = torch.load(path, weights_only=True)
        space = SearchSpace(ARCHITECTURES[blob["model_type"]], [LayerShape(*s) for s in blob["layers"]],
                            blob["hidden_size"], blob["model_type"], blob.get("fixed_parameters"))
        return cls(
            probs=UnitValues(**blob["probs"]), masks=UnitValues(**blob["masks"]), space=space,
            config=SearchConfig(**blob["config"]), history=blob["history"], nan_samples=blob["nan_samples"],
            seconds=blob["seconds"], levels=blob.get("levels"),
        )

    def kept_per_layer(self) -> list[tuple[int, int]]:
        """(kept KV groups, kept MLP channels) of every layer; 0 where the whole block is removed."""
        return [(s.num_kv_groups, s.intermediate_size) for s in kept_space(self.space, self.masks).layers]
