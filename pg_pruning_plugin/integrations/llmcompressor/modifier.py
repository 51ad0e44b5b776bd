"""``PolicyGradientPruningModifier``: the policy-gradient search as an llmcompressor recipe modifier.

The class holds the typed fields and the lifecycle; the rounding rules for group quantization are
in ``widths.py``, the re-batching of the calibration data in ``calibration.py``, the llmcompressor
workarounds in ``pg_pruning_plugin/compat/llmcompressor.py``. Importing this module registers the
modifier with llmcompressor's ``ModifierFactory``; ``import pg_pruning_plugin`` arranges that import
for the moment llmcompressor itself is imported. Like llmcompressor's own modifiers, the modifier
logs through loguru's ``logger`` (llmcompressor's log), so a plain ``oneshot()`` script shows what
was pruned.
"""

from __future__ import annotations

import dataclasses
import json

import torch
import torch.nn as nn
from llmcompressor.core import State
from llmcompressor.modifiers import Modifier, ModifierFactory
from loguru import logger
from pydantic import Field, PrivateAttr, model_validator

from ...compat.llmcompressor import patch_save_pretrained
from ...core import distributed
from ...core.architectures import SearchSpace, architecture_of, count_parameters, projections
from ...core.removal import prune_model
from ...refit import REFIT_METHODS, refit
from ...reporting import REPORT_FILE, format_accounting, pruning_report
from ...search.budget import Budget
from ...search.config import SearchConfig, SearchResult
from ...search.loop import PolicyGradientSearch
from .calibration import search_batches
from .widths import later_group_sizes, quantizable_masks, width_multiples

__all__ = ["PolicyGradientPruningModifier", "RecipeOrderError"]


class RecipeOrderError(ValueError):
    """The model was already quantized when the pruning modifier initialised."""


def _check_not_quantized(model: nn.Module) -> None:
    quantized = [p.name for p in projections(model) if hasattr(p.linear, "quantization_scheme")]
    if quantized:
        raise RecipeOrderError(
            f"{quantized[0]} (and {len(quantized) - 1} more) already carries a quantization scheme: a quantization "
            f"modifier initialised the model before PolicyGradientPruningModifier. Move PolicyGradientPruningModifier "
            f"first in the recipe (a stage before the quantization stage), so quantization sees the pruned shapes"
        )


def _check_single_process() -> None:
    """Refuse oneshot's distributed mode (several ranks) before any work, with what to run instead."""
    if distributed.is_distributed():
        raise ValueError(
            f"PolicyGradientPruningModifier does not run under oneshot's distributed mode ({distributed.world_size()} "
            f"ranks): oneshot gives every rank its own shard of the calibration set and holds the weights in "
            f"compressed-tensors' offloading shared between the ranks, while the search scores the same calibration "
            f"blocks on every rank and replaces each rank's weights (sub-network execution, removal) through "
            f"accelerate's hooks. Prune first with `torchrun --nproc-per-node N pg-prune prune ...` (or "
            f"PolicyGradientSearch under your own process group) and save the model, then run the quantization "
            f"recipe without the pruning stage on the saved model (docs/distributed.md)")


class PolicyGradientPruningModifier(Modifier):
    """Learn which KV groups, MLP channels and blocks to remove, then remove them, inside ``oneshot``.

    Put it first in a recipe, in front of quantization modifiers, and one ``oneshot`` call searches,
    physically prunes, quantizes and saves a compressed-tensors checkpoint.

    Sample yaml::

        pruning_stage:
          pruning_modifiers:
            PolicyGradientPruningModifier:
              sparsity: 0.3      # of the prunable parameters (allocation preset)
              steps: 100
              seq_len: 128
        quant_stage:
          quant_modifiers:
            GPTQModifier: {...}

    Lifecycle (llmcompressor 0.14, docs/llmcompressor.md):

    * ``on_initialize``, before any quantization modifier initialises: oneshot's distributed mode is
      refused (one process only; docs/distributed.md says how to prune with several), the architecture and the recipe
      order are checked, the kept widths are rounded for every later group quantization (``widths.py``;
      an impossible group size or an unreachable budget fails here, before the search), the calibration
      batches of ``oneshot`` are cached once and re-batched into search blocks, the search runs with
      full-model forward passes under ``torch.no_grad()``, the surviving weights are refitted on the same
      batches (``refit``, default least squares, docs/refit.md), and the chosen KV groups, MLP channels and
      whole blocks are removed (``core.removal.prune_model``; a decoder layer that loses both blocks is
      deleted). The later quantization modifiers then see the smaller model.
    * ``on_finalize``: ``model.save_pretrained`` is wrapped so that the saved ``config.json`` records the
      pruned widths and layer count (llmcompressor rewrites it from the original checkpoint) and the
      pruning report (``pruning_report.json``, reporting.py) is written next to it.

    The search fields are those of :class:`~pg_pruning_plugin.search.config.SearchConfig` (same names,
    types, defaults and checks; sparsities are fractions *removed*), plus ``seq_len`` and
    ``checkpoint_path``.
    """

    # -- the search (SearchConfig's fields) -----------------------------------------------------
    sparsity: float = Field(0.3, description="fraction removed: of the prunable parameters (allocation preset, or "
                                             "of the cost with a cost budget), or of each unit type (authors)")
    attn_sparsity: float | None = Field(None, description="fraction of KV groups removed (default: sparsity)")
    mlp_sparsity: float | None = Field(None, description="fraction of MLP channels removed (default: sparsity)")
    global_budget: bool = Field(True, description="one pool over all layers (per-layer widths differ)")
    preset: str = Field("allocation", description="fills the fields left at None: allocation (per-layer widths, "
                                                  "docs/method.md) | authors (the paper's per-unit search)")
    policy: str | None = Field(None, description="units | allocation (None: the preset's)")
    steps: int | None = Field(None, description="optimisation steps; needs steps x batch_size blocks (or max_epochs); "
                                                "authors preset: 15000")
    samples_per_step: int | None = Field(None, description="mask samples K per step (authors preset: 2)")
    lr: float | None = Field(None, description="learning rate, cosine to 0 (authors preset: 2e-3)")
    baseline_window: int = Field(5, description="EMA baseline window W (0: no baseline)")
    batch_size: int = Field(8, description="blocks per search step")
    max_epochs: int | None = Field(None, description="passes allowed over the calibration blocks, 0: no limit "
                                                     "(authors preset: 1)")
    loss: str | None = Field(None, description="ce | kl (to the dense model's top kl_top_k tokens)")
    kl_top_k: int = Field(64, description="tokens of the dense distribution the kl loss compares")
    incumbent_every: int | None = Field(None, description="steps between held-in checks of the deployed mask (0: none)")
    held_in_blocks: int = Field(32, description="calibration blocks kept out of the steps for the incumbent check")
    block_size: int = Field(64, description="allocation: MLP channels per level")
    level_band: int = Field(8, description="allocation: MLP levels on each side of the reference with weights")
    ranking: str = Field("obs", description="allocation: unit order inside a layer")
    loop_refit: str | None = Field(None, description="weights a candidate is scored with: lstsq | bias | none")
    band: float | None = Field(None, description="units: sample only this fraction of a layer's units around its "
                                                 "threshold")
    refit_damping: float = Field(0.01, description="damping of the least-squares fits (fraction of mean diag H)")
    init: str = Field("wanda-sp", description="initial importance metric (scoring.metrics.METRICS)")
    init_mapping: str = Field("sigmap", description="metric to initial keep-probabilities (search.init)")
    init_confidence: float = Field(0.9, description="keep-probability of init-mask units under init_mapping=mask")
    init_batches: int = Field(16, description="calibration batches read by the initial metric")
    round_to: int | None = Field(None, description="kept MLP widths rounded to the nearest multiple "
                                                   "(combined with later group sizes)")
    seed: int = Field(42, description="mask sampling and batch order")
    checkpoint_every: int = Field(100, description="steps between search-state snapshots")
    samples_in_one_forward: bool = Field(True, description="evaluate the K samples as one [K*B, T] batch")
    mask_rule: str = Field("topk", description="final mask of a per-type budget: topk | expected-width")
    estimator: str = Field("authors", description="gradient estimator: authors | loo | antithetic")
    execution: str | None = Field(None, description="mask: zero dropped units; gather: skip their compute "
                                                     "(authors preset: mask)")
    granularity: str = Field("width", description="units: width | depth | width+depth")
    cost: str | None = Field(None, description="one budget in params | flops | custom (None: per-type budgets)")
    cost_seq_len: int = Field(2048, description="context length of the FLOPs cost and report")
    custom_costs: dict[str, float] | None = Field(None, description="cost=custom: {attn: c, mlp: c} per unit")
    keep_params: int | None = Field(None, description="one parameter budget: parameters left in the whole model")
    # -- the modifier's own ---------------------------------------------------------------------
    refit: str = Field("lstsq", description="repair of the surviving weights on the calibration blocks before "
                                            "removal: lstsq | bias | none (docs/refit.md)")
    seq_len: int | None = Field(None, ge=2, description="cut calibration sequences into blocks of this many "
                                                        "tokens for the search (None: as oneshot delivers them)")
    checkpoint_path: str | None = Field(None, description="search-state file; an existing one is resumed "
                                                          "(a finished one is reused without steps)")
    requires_calibration_data: bool = False  # runs its own forward loop; avoids a wasted pipeline pass

    _report: dict = PrivateAttr(default_factory=dict)
    _result: SearchResult | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _valid_search_config(self):
        config = self.search_config()  # SearchConfig's own range and name checks, at recipe-parse time
        if self.refit not in REFIT_METHODS:
            raise ValueError(f"refit must be one of {', '.join(REFIT_METHODS)}, got {self.refit!r}")
        if self.custom_costs is not None and config.cost != "custom":
            raise ValueError(f"custom_costs is only read with cost: custom (cost is {config.cost!r}); "
                             f"set cost: custom or remove custom_costs")
        return self

    def search_config(self, round_to: int | None = None) -> SearchConfig:
        """The :class:`SearchConfig` of these fields (``round_to`` overrides the field)."""
        config = SearchConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SearchConfig)})
        return dataclasses.replace(config, round_to=round_to) if round_to is not None else config

    @property
    def report(self) -> dict:
        """The pruning report (reporting.py) of the run, after initialize."""
        return dict(self._report)

    @property
    def result(self) -> SearchResult | None:
        """The search result (probabilities, masks, loss history) after initialize."""
        return self._result

    # -- lifecycle ------------------------------------------------------------------------------
    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        _check_single_process()
        architecture_of(model)  # unsupported model types fail before any work
        _check_not_quantized(model)
        if state.data.calib is None:
            raise ValueError(
                f"{type(self).__name__} needs calibration data for its search: pass `dataset=` to oneshot "
                "(for example a datasets.Dataset with input_ids and attention_mask)"
            )
        space = SearchSpace.from_model(model)
        group_sizes = later_group_sizes(self, model)
        attn_multiple, mlp_multiple = width_multiples(group_sizes, model, space, self.round_to)
        config = self.search_config(round_to=mlp_multiple if mlp_multiple > 1 else None)
        Budget.of(space, config)  # BudgetError with the reachable range, before any data is read
        batches = search_batches(state.data.calib, config.batch_size, self.seq_len)
        logger.info("policy-gradient search on {} cached batches of {} tokens", len(batches),
                    tuple(batches[0]["input_ids"].shape))
        params_before = count_parameters(model)
        with torch.no_grad():
            search = PolicyGradientSearch(model, batches, config, checkpoint_path=self.checkpoint_path)
            result = search.run()
            masks = quantizable_masks(result, attn_multiple, mlp_multiple)
            refit_report = refit(model, masks, batches, self.refit, damping=self.refit_damping)
            prune_model(model, masks)
        self._result = result
        self._report = pruning_report(space, masks, search.budget, result, params=(params_before,
                                      count_parameters(model)), group_sizes=[g for _, g in group_sizes.values()],
                                      refit=refit_report.as_dict())
        logger.info("{}: {}", type(self).__name__, self._report["summary"])
        logger.info("{}", format_accounting(self._report["accounting"]))
        return True

    def on_finalize(self, state: State, **kwargs) -> bool:
        if self._report:
            patch_save_pretrained(state.model, lambda: {REPORT_FILE: json.dumps(self._report, indent=2)})
        return True


ModifierFactory.register(PolicyGradientPruningModifier.__name__, PolicyGradientPruningModifier)
