"""What defines a search (:class:`SearchConfig`) and what it returns (:class:`SearchResult`)."""

from __future__ import annotations

import dataclasses
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
from .policy import ESTIMATORS

__all__ = ["EXECUTIONS", "ResumeError", "SearchConfig", "SearchResult"]

EXECUTIONS = ("mask", "gather")  # core.masking.masked / core.subnetwork.subnetwork


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
    ``keep_params`` gives that one parameter budget as the number of parameters left in the whole
    model (``cost`` params; ``sparsity`` is then not read): the search's
    :class:`~pg_pruning_plugin.search.budget.Budget` turns it into the fraction removed.
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
    init_mapping: str = "sigmap"  # search.init.INIT_MAPPINGS
    init_confidence: float = 0.9  # keep-probability of init-mask units under init_mapping="mask"
    init_batches: int = 16  # calibration batches used by activation metrics
    round_to: int | None = None  # kept MLP widths rounded to the nearest multiple
    seed: int = 42
    checkpoint_every: int = 100
    samples_in_one_forward: bool = True  # evaluate the K samples as one [K·B, T] batch
    mask_rule: str = "topk"  # final mask: global top-k (paper) or per-layer expected width, core.selection.MASK_RULES
    estimator: str = "authors"  # a key of search.policy.ESTIMATORS: authors | loo | antithetic
    execution: str = "mask"  # mask: zero dropped units; gather: skip them, one forward per sample
    granularity: str = "width"  # search.budget.GRANULARITIES: width | depth | width+depth
    cost: str | None = None  # None: separate budgets per unit type (paper); params | flops | custom: one budget
    cost_seq_len: int = 2048  # context length of the FLOPs cost
    custom_costs: dict[str, float] | None = None  # cost="custom": {"attn": per KV group, "mlp": per channel}
    keep_params: int | None = None  # one parameter budget as the parameters left in the whole model

    def __post_init__(self) -> None:
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
        if ESTIMATORS[self.estimator].antithetic and self.samples_per_step % 2:
            raise ValueError(f"the {self.estimator} estimator needs an even samples_per_step (pairs u, 1-u)")
        if self.execution not in EXECUTIONS:
            raise ValueError(f"execution={self.execution!r}; choose one of {', '.join(EXECUTIONS)}")


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
            seconds=blob["seconds"],
        )

    def kept_per_layer(self) -> list[tuple[int, int]]:
        """(kept KV groups, kept MLP channels) of every layer; 0 where the whole block is removed."""
        return [(s.num_kv_groups, s.intermediate_size) for s in kept_space(self.space, self.masks).layers]
