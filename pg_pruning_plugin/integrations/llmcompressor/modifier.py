"""``PolicyGradientPruningModifier``: the policy-gradient search as an llmcompressor recipe modifier.

Put it first in a recipe, in front of quantization modifiers, and one ``oneshot`` call searches,
physically prunes, quantizes and saves a compressed-tensors checkpoint::

    import pg_pruning_plugin  # registers the modifier with llmcompressor's ModifierFactory
    from llmcompressor import oneshot
    oneshot(model="path/to/model", dataset=ds, recipe="recipes/pg30_gptq_w4a16.yaml", output_dir="out")

What happens, in the order llmcompressor 0.14 calls it (llmcompressor.md §2, §6, §8):

* ``on_initialize`` (before any quantization modifier initialises): the calibration batches of
  ``oneshot`` are cached once and re-batched into search blocks, the search runs with full-model
  forward passes under ``torch.no_grad()`` (:class:`~pg_pruning_plugin.search.PolicyGradientSearch`),
  and the chosen KV groups, MLP channels and (``granularity`` depth or width+depth) whole attention
  and MLP blocks are removed with :func:`~pg_pruning_plugin.removal.prune_model`; a decoder layer
  that loses both blocks is deleted. The later quantization modifiers then see the smaller model.
  Kept widths are rounded so that every group quantization of the recipe divides them; an
  impossible group size or an unreachable cost budget fails before the search.
* ``on_finalize``: ``model.save_pretrained`` is wrapped once more so that the saved ``config.json``
  records the pruned widths and layer count (llmcompressor rewrites it from the original
  checkpoint) and a ``pg_pruning_report.json`` is written next to it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from functools import wraps
from pathlib import Path
from typing import Any, get_type_hints

import torch
import torch.nn as nn
from compressed_tensors.quantization import QuantizationStrategy
from compressed_tensors.utils import match_named_modules
from llmcompressor.core import State, active_session
from llmcompressor.modifiers import Modifier, ModifierFactory
from llmcompressor.modifiers.quantization.quantization.mixin import QuantizationMixin
from pydantic import Field, PrivateAttr, create_model, model_validator

from ...core.architectures import SearchSpace, architecture_of, decoder_layers
from ...search.budget import budget_accounting, expected_cost, format_accounting
from ...scoring.metrics import UnitScores
from ...core.removal import kept_space, prune_model
from ...search.loop import PolicyGradientSearch, SearchConfig, SearchResult, cost_budget

__all__ = ["PolicyGradientPruningModifier", "RecipeOrderError", "quantizable_masks", "search_batches", "write_pruned_config"]

logger = logging.getLogger(__name__)

# Config keys pruning changes; llmcompressor 0.14 saves config.json from the original checkpoint, so they are
# written back after every save (num_hidden_layers and layer_types shrink when whole layers are deleted).
PRUNED_CONFIG_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size", "head_dim", "pruned_layers",
                      "num_hidden_layers", "layer_types")
REPORT_FILE = "pg_pruning_report.json"
_GROUPED = (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP)


class RecipeOrderError(ValueError):
    """The model was already quantized when the pruning modifier initialised."""


class _PolicyGradientPruningBase(Modifier):
    """Lifecycle and the fields that are not search settings; the search fields are added below."""

    requires_calibration_data: bool = False  # runs its own forward loop; avoids a wasted pipeline pass
    seq_len: int | None = Field(None, ge=2)
    checkpoint_path: str | None = None

    _report: dict = PrivateAttr(default_factory=dict)
    _result: SearchResult | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _valid_search_config(self):
        config = self.search_config()  # SearchConfig's own range and name checks, at recipe-parse time
        if self.custom_costs is not None and config.cost != "custom":
            raise ValueError(f"custom_costs is only read with cost: custom (cost is {config.cost!r}); "
                             f"set cost: custom or remove custom_costs")
        return self

    def search_config(self, round_to: int | None = None) -> SearchConfig:
        """The core :class:`SearchConfig` of these fields (``round_to`` overrides the field)."""
        config = SearchConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SearchConfig)})
        return dataclasses.replace(config, round_to=round_to) if round_to is not None else config

    @property
    def report(self) -> dict:
        """Requested and effective budgets, kept widths per layer and search statistics (after initialize)."""
        return dict(self._report)

    @property
    def result(self) -> SearchResult | None:
        """The search result (probabilities, masks, loss history) after initialize."""
        return self._result

    # -- lifecycle ------------------------------------------------------------------------------
    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        architecture_of(model)  # unsupported model types fail before any work
        _check_not_quantized(model)
        if state.data.calib is None:
            raise ValueError(
                f"{type(self).__name__} needs calibration data for its search: pass `dataset=` to oneshot "
                "(for example a datasets.Dataset with input_ids and attention_mask)"
            )
        space = SearchSpace.from_model(model)
        attn_multiple, mlp_multiple, group_sizes = self._width_multiples(model, space)
        config = self.search_config(round_to=mlp_multiple if mlp_multiple > 1 else None)
        if config.cost is not None:
            cost_budget(space, config)  # BudgetError with the reachable range, before any data is read
        batches = search_batches(state.data.calib, config.batch_size, self.seq_len)
        logger.info("policy-gradient search on %d cached batches of %s tokens", len(batches),
                    tuple(batches[0]["input_ids"].shape))
        with torch.no_grad():
            search = PolicyGradientSearch(model, batches, config, checkpoint_path=self.checkpoint_path)
            result = search.run()
            masks = quantizable_masks(result, attn_multiple, mlp_multiple)
            prune_model(model, masks)
        self._result = result
        self._report = _budget_report(space, masks, config, result, group_sizes)
        logger.info("%s", self._report["summary"])
        logger.info("%s", format_accounting(self._report["accounting"]))
        return True

    def on_finalize(self, state: State, **kwargs) -> bool:
        if self._report:
            _patch_save_pretrained(state.model, self._report)
        return True

    # -- group sizes ----------------------------------------------------------------------------
    def _width_multiples(self, model: nn.Module, space: SearchSpace) -> tuple[int, int, dict[str, int]]:
        """(KV groups per layer multiple, MLP channel multiple, {module: group size}) for the recipe.

        Raises ``ValueError`` before the search when a later modifier's group size can never divide a
        width that pruning produces (or the hidden size, which pruning never changes).
        """
        group_sizes = _later_group_sizes(self, model)
        roles = {id(lin): role for _, role, lin in _projections(model)}
        attn_g, mlp_g, fixed = 1, 1, []
        for name, (module, g) in group_sizes.items():
            role = roles.get(id(module))
            if role == "o":
                attn_g = math.lcm(attn_g, g)
            elif role == "down":
                mlp_g = math.lcm(mlp_g, g)
            elif role is not None:  # q/k/v/gate/up read the hidden size, which pruning never changes
                fixed.append((name, g))
        bad = [(n, g) for n, g in fixed if space.hidden_size >= g and space.hidden_size % g]
        if bad:
            raise ValueError(
                f"the recipe quantizes {len(bad)} projections (e.g. {bad[0][0]}) with group size {bad[0][1]}, which "
                f"does not divide the hidden size {space.hidden_size}; their input width is never pruned, so no "
                f"rounding can fix it. Use config_groups with a group_size dividing {space.hidden_size} "
                f"(e.g. {math.gcd(space.hidden_size, 128)}) or put these modules in the quantization `ignore` list"
            )
        mlp_multiple = math.lcm(self.round_to or 1, mlp_g)
        attn_multiple = 1
        for i, shape in enumerate(space.layers):
            width = shape.queries_per_group * shape.head_dim  # o_proj columns per KV group
            attn_multiple = math.lcm(attn_multiple, attn_g // math.gcd(attn_g, width))
            if shape.num_kv_groups < attn_multiple:
                raise ValueError(
                    f"group size {attn_g} cannot divide any o_proj width of layer {i}: a KV group has {width} "
                    f"columns and the layer only {shape.num_kv_groups} groups; use a group size dividing {width}"
                )
            if shape.intermediate_size < mlp_multiple:
                raise ValueError(
                    f"kept MLP widths must be multiples of {mlp_multiple} (round_to and group sizes), but layer {i} "
                    f"has only {shape.intermediate_size} channels; use a smaller group size or round_to"
                )
        if group_sizes:
            logger.info("group quantization later in the recipe (%s): kept MLP widths rounded to multiples of %d, "
                        "kept KV groups per layer to multiples of %d", sorted({g for _, g in group_sizes.values()}),
                        mlp_multiple, attn_multiple)
        return attn_multiple, mlp_multiple, {name: g for name, (_, g) in group_sizes.items()}


def _later_group_sizes(modifier: Modifier, model: nn.Module) -> dict[str, tuple[nn.Module, int]]:
    """Modules a group-quantization scheme of a *later* modifier in the active recipe targets."""
    modifiers = list(active_session().lifecycle.recipe.modifiers)
    index = next((i for i, m in enumerate(modifiers) if m is modifier), None)
    found: dict[str, tuple[nn.Module, int]] = {}
    for later in [] if index is None else modifiers[index + 1:]:  # None: initialised outside a recipe
        if not isinstance(later, QuantizationMixin):
            continue
        for scheme in later.resolved_config.config_groups.values():
            weights = scheme.weights
            if weights is None or weights.strategy not in _GROUPED or not weights.group_size:
                continue
            for name, module in match_named_modules(model, scheme.targets, later.ignore):
                if isinstance(module, nn.Linear):
                    previous = found.get(name, (module, 1))[1]
                    found[name] = (module, math.lcm(previous, int(weights.group_size)))
    return found


def _projections(model: nn.Module) -> list[tuple[str, str, nn.Linear]]:
    """(name, role, Linear) of every prunable projection; role is q/k/v/o/gate/up/down."""
    spec = architecture_of(model)
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        for part, roles in ((spec.attention, ("q", "k", "v", "o")), (spec.mlp, ("gate", "up", "down"))):
            parent = getattr(layer, part)
            for role in roles:
                attr = getattr(spec, role)
                out.append((f"layers.{i}.{part}.{attr}", role, getattr(parent, attr)))
    return out


def _check_not_quantized(model: nn.Module) -> None:
    quantized = [name for name, _, lin in _projections(model) if hasattr(lin, "quantization_scheme")]
    if quantized:
        raise RecipeOrderError(
            f"{quantized[0]} (and {len(quantized) - 1} more) already carries a quantization scheme: a quantization "
            f"modifier initialised the model before PolicyGradientPruningModifier. Move PolicyGradientPruningModifier "
            f"first in the recipe (a stage before the quantization stage), so quantization sees the pruned shapes"
        )


def search_batches(loader, batch_size: int, seq_len: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Cache one pass of ``loader`` as search batches of ``batch_size`` rows.

    Padding is removed row by row (``attention_mask``), rows are optionally cut into ``seq_len``-token
    blocks (a shorter tail is dropped unless it is the whole row), regrouped, and right-padded with an
    ``attention_mask``. A partial last batch is dropped when at least one full batch exists.
    """
    rows: list[torch.Tensor] = []
    for batch in loader:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        for r in range(ids.shape[0]):
            tokens = ids[r] if mask is None else ids[r][mask[r].bool()]
            if seq_len and tokens.numel() > seq_len:
                tokens = tokens[: tokens.numel() // seq_len * seq_len]
                rows += list(tokens.split(seq_len))
            elif tokens.numel() >= 2:
                rows.append(tokens)
    if not rows:
        raise ValueError("the calibration data holds no sequence of at least 2 tokens")
    n = len(rows) // batch_size * batch_size or len(rows)
    batches = []
    for start in range(0, n, batch_size):
        group = rows[start:start + batch_size]
        length = max(t.numel() for t in group)
        ids = torch.zeros(len(group), length, dtype=torch.long)
        attention = torch.zeros(len(group), length, dtype=torch.long)
        for j, t in enumerate(group):
            ids[j, : t.numel()] = t
            attention[j, : t.numel()] = 1
        batches.append({"input_ids": ids, "attention_mask": attention})
    return batches


def quantizable_masks(result: SearchResult, attn_multiple: int, mlp_multiple: int) -> UnitScores:
    """``result.masks`` with every layer's kept count rounded to a multiple (KV groups / MLP channels).

    Each count goes to the nearest multiple that is at least one multiple and at most the layer width:
    the most probable dropped units are added, or the least probable kept units removed. Block masks
    (depth granularity) are kept as they are, and the widths of removed blocks are not rounded.
    """
    space, probs, masks = result.space, result.probs, result.masks
    attn_kept = masks.attn_blocks.bool().tolist() if masks.has_blocks else None
    mlp_kept = masks.mlp_blocks.bool().tolist() if masks.has_blocks else None
    return UnitScores(_round_kept(masks.attn, probs.attn, space.attn_offsets, attn_multiple, attn_kept),
                      _round_kept(masks.mlp, probs.mlp, space.mlp_offsets, mlp_multiple, mlp_kept),
                      None if masks.attn_blocks is None else masks.attn_blocks.clone(),
                      None if masks.mlp_blocks is None else masks.mlp_blocks.clone())


def _round_kept(mask: torch.Tensor, probs: torch.Tensor, offsets: list[int], multiple: int,
                blocks_kept: list[bool] | None = None) -> torch.Tensor:
    mask = mask.clone()
    for layer, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        if blocks_kept is not None and not blocks_kept[layer]:
            continue  # the whole block goes: its width is never built
        kept = int(mask[a:b].sum())
        target = min((b - a) // multiple * multiple, max(multiple, math.floor(kept / multiple + 0.5) * multiple))
        order = torch.argsort(probs[a:b] + 2 * mask[a:b], descending=True)  # kept units first, by probability
        mask[a:b] = 0
        mask[a + order[:target]] = 1
    return mask


def _budget_report(before: SearchSpace, masks: UnitScores, config: SearchConfig, result: SearchResult,
                   group_sizes: dict[str, int]) -> dict:
    """Requested vs achieved budgets of the final ``masks`` on the unpruned space ``before``.

    Per-layer entries cover every layer of ``before``; a removed block has 0 heads or 0 channels, a
    deleted decoder layer both.
    """
    after = kept_space(before, masks)
    attn_removed = 1 - after.num_attn_units / before.num_attn_units
    mlp_removed = 1 - after.num_mlp_units / before.num_mlp_units
    params_removed = 1 - after.prunable_parameters() / before.prunable_parameters()
    removed_attn = [i for i, s in enumerate(after.layers) if s.num_kv_groups == 0]
    removed_mlp = [i for i, s in enumerate(after.layers) if s.intermediate_size == 0]
    deleted = sorted(set(removed_attn) & set(removed_mlp))
    sizes = sorted(set(group_sizes.values()))

    cost = None
    requested = {"granularity": config.granularity, "cost": config.cost}
    if config.cost is None:  # the paper's separate budgets
        requested |= {"attn_sparsity": 1 - config.attn_keep, "mlp_sparsity": 1 - config.mlp_keep}
    else:
        costs, budget = cost_budget(before, config)
        dense = float(costs.attn.sum() + costs.mlp.sum())
        kept = expected_cost(masks, costs, before)  # exact kept cost of 0/1 masks
        cost = {"cost": config.cost, "dense": dense, "requested_kept": budget, "kept": kept,
                "requested_sparsity": config.sparsity, "effective_sparsity": 1 - kept / dense}
        requested |= {"cost_sparsity": config.sparsity}
    accounting = budget_accounting(
        before, masks, config.cost_seq_len,
        requested_params=cost["requested_kept"] if config.cost == "params" else None,
        requested_flops=cost["requested_kept"] if config.cost == "flops" else None,
    )
    flops = accounting["flops_per_token"]
    flops_removed = 1 - flops["kept"] / flops["dense"]

    widths = (f"KV groups {100 * attn_removed:.1f}%, MLP channels {100 * mlp_removed:.1f}%, prunable parameters "
              f"{100 * params_removed:.1f}%, FLOPs/token at {config.cost_seq_len} tokens {100 * flops_removed:.1f}%")
    if cost is None:
        summary = (
            f"pruned KV groups {100 * attn_removed:.1f}% (requested {100 * (1 - config.attn_keep):.1f}%), "
            f"MLP channels {100 * mlp_removed:.1f}% (requested {100 * (1 - config.mlp_keep):.1f}%), "
            f"prunable parameters {100 * params_removed:.1f}%"
        )
    else:
        unit = {"params": "prunable parameters", "flops": f"prunable FLOPs/token at {config.cost_seq_len} tokens",
                "custom": "custom cost"}[config.cost]
        summary = (
            f"cost budget ({config.cost}, granularity {config.granularity}): removed "
            f"{100 * cost['effective_sparsity']:.1f}% of the {unit} (requested {100 * config.sparsity:.1f}%); "
            f"removed {_count(len(removed_attn), 'attention block')}, {_count(len(removed_mlp), 'MLP block')} "
            f"({_count(len(deleted), 'decoder layer')} deleted); removed in total: {widths}"
        )
    summary += (f"; widths rounded for group size {sizes}" if sizes else "") + (
        f"; MLP widths multiples of {config.round_to}" if config.round_to else "")
    return {
        "summary": summary,
        "requested": requested,
        "effective": {"attn_sparsity": attn_removed, "mlp_sparsity": mlp_removed,
                      "prunable_parameter_sparsity": params_removed, "flops_sparsity": flops_removed}
                     | ({"cost_sparsity": cost["effective_sparsity"]} if cost else {}),
        "cost_budget": cost,
        "removed_blocks": {"attn": removed_attn, "mlp": removed_mlp, "deleted_layers": deleted},
        "group_sizes": sizes, "round_to": config.round_to,
        "kept_per_layer": [{"q_heads": s.num_attention_heads, "kv_heads": s.num_kv_groups, "mlp": s.intermediate_size}
                           for s in after.layers],
        "accounting": accounting,
        "steps": config.steps, "samples_per_step": config.samples_per_step,
        "search_seconds": result.seconds, "nan_samples": result.nan_samples,
        "final_loss": result.history["loss"][-1] if result.history.get("loss") else None,
    }


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _patch_save_pretrained(model: nn.Module, report: dict) -> None:
    """Wrap ``model.save_pretrained`` so the saved config records the pruned widths (llmcompressor.md §8)."""
    inner = model.save_pretrained
    if getattr(inner, "_pg_pruning_config_patch", False):
        return

    @wraps(inner)
    def save_pretrained(save_directory, *args, **kwargs):
        inner(save_directory, *args, **kwargs)
        write_pruned_config(model, save_directory)
        (Path(save_directory) / REPORT_FILE).write_text(json.dumps(report, indent=2))

    save_pretrained._overridden = True  # llmcompressor must not wrap it again
    save_pretrained._pg_pruning_config_patch = True
    model.save_pretrained = save_pretrained


def write_pruned_config(model: nn.Module, save_directory: str | os.PathLike) -> None:
    """Rewrite the pruned-shape keys of ``save_directory/config.json`` from ``model``'s in-memory config."""
    path = Path(save_directory) / "config.json"
    saved = json.loads(path.read_text())
    target = saved.get("text_config", saved)
    config = model.config.get_text_config()
    target.update({key: getattr(config, key) for key in PRUNED_CONFIG_KEYS if getattr(config, key, None) is not None})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(saved, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _search_fields() -> dict[str, tuple[Any, Any]]:
    """Every :class:`SearchConfig` field as a typed pydantic field with the same default."""
    hints = get_type_hints(SearchConfig)
    return {f.name: (hints[f.name], f.default) for f in dataclasses.fields(SearchConfig)}


PolicyGradientPruningModifier = create_model(
    "PolicyGradientPruningModifier",
    __base__=_PolicyGradientPruningBase,
    __module__=__name__,
    __doc__="""Learn which KV groups, MLP channels and blocks to remove, then remove them, inside ``oneshot``.

    Fields: every :class:`~pg_pruning_plugin.search.SearchConfig` field (same name, type, default and
    checks; sparsities are fractions *removed*), plus

    * ``seq_len``: cut each calibration sequence into blocks of this many tokens for the search
      (the paper trains on 128-token blocks while GPTQ usually calibrates on 2048); ``None`` uses
      the sequences as ``oneshot`` delivers them;
    * ``checkpoint_path``: search-state file written every ``checkpoint_every`` steps; an existing
      file is resumed (a finished one is reused without search steps).

    ``round_to`` rounds kept MLP widths; it is combined automatically with the group size of any
    group-quantization scheme later in the recipe, and kept KV groups are rounded so that
    ``o_proj``'s input width is divisible too.

    ``granularity`` (width | depth | width+depth) adds whole attention and MLP blocks as units;
    ``cost`` (params | flops | custom, with ``cost_seq_len`` and ``custom_costs``) makes
    ``sparsity`` one budget over all units (depth defaults to params). A budget that no mask can
    meet raises :class:`~pg_pruning_plugin.budget.BudgetError` with the reachable range before the search.
    """,
    **_search_fields(),
)

ModifierFactory.register(PolicyGradientPruningModifier.__name__, PolicyGradientPruningModifier)
