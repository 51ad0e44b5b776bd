"""What a pruning run reports: one report schema (``pruning_report.json``), text tables and plots.

:func:`pruning_report` builds the one report that ``pg-prune prune`` and the llmcompressor modifier
both write as :data:`REPORT_FILE` next to the pruned model. Its keys:

=========================  =====================================================================
``summary``                one line: removed fractions against the requested ones
``requested``              the budget as asked (``Budget.requested()``; ``cost`` is None for the
                           paper's per-type budget)
``effective``              removed fractions achieved: ``attn_sparsity``, ``mlp_sparsity``,
                           ``prunable_parameter_sparsity``, ``flops_sparsity`` (and ``cost_sparsity``)
``cost_budget``            requested vs kept cost of a cost budget (``Budget.achieved``), else None
``removed_blocks``         ``attn`` / ``mlp`` layers whose block was removed, ``deleted_layers``
``kept_per_layer``         ``{"q_heads", "kv_heads", "mlp"}`` per original layer (0: removed block)
``accounting``             prunable parameters and FLOPs, dense / requested / kept, per layer and by
                           unit kind (``search.costs.budget_accounting``)
``params_before/after``    all parameters of the model (None when not counted)
``prunable_params_*``      q/k/v/o/gate/up/down parameters before and after
``round_to``, ``group_sizes``  MLP width multiple of the search, group sizes the widths were rounded for
``search``                 ``steps``, ``samples_per_step``, ``seconds``, ``nan_samples``, ``final_loss``
``config``                 the :class:`~pg_pruning_plugin.search.config.SearchConfig` as a dict
``evaluation``             ``dense_ppl``, ``pruned_ppl``, ``protocol`` and, with a comparison, ``baseline``
                           (``method``, ``refit``, ``ppl`` on the same windows) (``pg-prune prune``), or None
``refit``                  the refit of the surviving weights (``refit.RefitReport.as_dict``: method,
                           damping, tokens, seconds, per-projection errors before/after), or None
``distributed``            how the search's steps were split over ranks
                           (``core.distributed.StepSplit.as_dict``: ``world_size``, ``sample_groups``,
                           ``data_shards``, candidates and sequences per rank); world size 1 for one process
``run``                    how the run was started (``pg-prune prune``: model, calibration, arguments), or None
=========================  =====================================================================
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .core.architectures import SearchSpace
from .core.removal import kept_space
from .core.units import UnitValues

if TYPE_CHECKING:
    from .search.budget import Budget
    from .search.config import SearchResult

__all__ = ["REPORT_FILE", "format_accounting", "layer_table", "plot_curves", "plot_layer_widths", "pruning_report"]

REPORT_FILE = "pruning_report.json"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _summary(budget: Budget, report: dict) -> str:
    requested, effective, removed = report["requested"], report["effective"], report["removed_blocks"]
    widths = (f"KV groups {100 * effective['attn_sparsity']:.1f}%, MLP channels "
              f"{100 * effective['mlp_sparsity']:.1f}%, prunable parameters "
              f"{100 * effective['prunable_parameter_sparsity']:.1f}%, FLOPs/token at {budget.seq_len} tokens "
              f"{100 * effective['flops_sparsity']:.1f}%")
    if requested["cost"] is None:
        summary = (
            f"pruned KV groups {100 * effective['attn_sparsity']:.1f}% (requested "
            f"{100 * requested['attn_sparsity']:.1f}%), MLP channels {100 * effective['mlp_sparsity']:.1f}% "
            f"(requested {100 * requested['mlp_sparsity']:.1f}%), prunable parameters "
            f"{100 * effective['prunable_parameter_sparsity']:.1f}%"
        )
    else:
        unit = {"params": "prunable parameters", "flops": f"prunable FLOPs/token at {budget.seq_len} tokens",
                "custom": "custom cost"}[requested["cost"]]
        summary = (
            f"cost budget ({requested['cost']}, granularity {requested['granularity']}): removed "
            f"{100 * effective['cost_sparsity']:.1f}% of the {unit} "
            f"(requested {100 * requested['cost_sparsity']:.1f}%); "
            f"removed {_count(len(removed['attn']), 'attention block')}, {_count(len(removed['mlp']), 'MLP block')} "
            f"({_count(len(removed['deleted_layers']), 'decoder layer')} deleted); removed in total: {widths}"
        )
    sizes = report["group_sizes"]
    return summary + (f"; widths rounded for group size {sizes}" if sizes else "") + (
        f"; MLP widths multiples of {budget.round_to}" if budget.round_to else "")


def pruning_report(before: SearchSpace, masks: UnitValues, budget: Budget, result: SearchResult, *,
                   params: tuple[int, int] | None = None, group_sizes: Sequence[int] = (),
                   evaluation: dict | None = None, run: dict | None = None,
                   distributed: dict | None = None, refit: dict | None = None) -> dict:
    """The report of pruning ``before`` (the unpruned space) to the final ``masks`` under ``budget``
    (module docstring). ``params``: all parameters of the model before and after removal; ``distributed``:
    the search's ``split.as_dict()`` (default: one process)."""
    after = kept_space(before, masks)
    accounting = budget.accounting(masks)
    flops = accounting["flops_per_token"]
    achieved = budget.achieved(masks)
    removed_attn = [i for i, s in enumerate(after.layers) if s.num_kv_groups == 0]
    removed_mlp = [i for i, s in enumerate(after.layers) if s.intermediate_size == 0]
    effective = {"attn_sparsity": 1 - after.num_attn_units / before.num_attn_units,
                 "mlp_sparsity": 1 - after.num_mlp_units / before.num_mlp_units,
                 "prunable_parameter_sparsity": 1 - after.prunable_parameters() / before.prunable_parameters(),
                 "flops_sparsity": 1 - flops["kept"] / flops["dense"]}
    if achieved is not None:
        effective["cost_sparsity"] = achieved["effective_sparsity"]
    losses = result.history.get("loss")
    report = {
        "requested": budget.requested(),
        "effective": effective,
        "cost_budget": achieved,
        "removed_blocks": {"attn": removed_attn, "mlp": removed_mlp,
                           "deleted_layers": sorted(set(removed_attn) & set(removed_mlp))},
        "kept_per_layer": [{"q_heads": s.num_attention_heads, "kv_heads": s.num_kv_groups, "mlp": s.intermediate_size}
                           for s in after.layers],
        "accounting": accounting,
        "params_before": params[0] if params else None,
        "params_after": params[1] if params else None,
        "prunable_params_before": before.prunable_parameters(),
        "prunable_params_after": after.prunable_parameters(),
        "round_to": budget.round_to,
        "group_sizes": sorted(set(group_sizes)),
        "search": {"steps": result.config.steps, "samples_per_step": result.config.samples_per_step,
                   "seconds": result.seconds, "nan_samples": result.nan_samples,
                   "final_loss": losses[-1] if losses else None},
        "config": dataclasses.asdict(result.config),
        "evaluation": evaluation,
        "refit": refit,
        "distributed": distributed or {"world_size": 1},
        "run": run,
    }
    return {"summary": _summary(budget, report), **report}


def layer_table(before: SearchSpace, after: SearchSpace) -> str:
    """One line per layer: query heads, KV heads and MLP channels before -> after."""
    lines = ["layer  q heads   kv heads  mlp channels"]
    for i, (a, b) in enumerate(zip(before.layers, after.layers)):
        lines.append(
            f"{i:>5}  {a.num_attention_heads:>2} -> {b.num_attention_heads:<3} {a.num_kv_groups:>2} -> "
            f"{b.num_kv_groups:<3}  {a.intermediate_size:>5} -> {b.intermediate_size}"
        )
    return "\n".join(lines)


def format_accounting(acc: dict) -> str:
    """A short text table of :func:`~pg_pruning_plugin.search.costs.budget_accounting`'s output."""
    def pct(x: float, of: float) -> str:
        return f"{100 * x / of:.1f}%" if of else "-"

    p, f = acc["prunable_params"], acc["flops_per_token"]
    lines = [f"budget: prunable parameters {p['dense']:,.0f} -> {p['kept']:,.0f} kept ({pct(p['kept'], p['dense'])}"
             + (f"; requested {p['requested']:,.0f}, {pct(p['requested'], p['dense'])})" if p["requested"] else ")"),
             f"        forward FLOPs/token at {acc['seq_len_for_flops']} tokens {f['dense']:,.0f} -> {f['kept']:,.0f} "
             f"({pct(f['kept'], f['dense'])}"
             + (f"; requested {pct(f['requested'], f['dense'])})" if f["requested"] else ")")]
    removed = acc["removed_by"]
    lines.append("removed parameters by unit kind: " + ", ".join(
        f"{k.replace('_', ' ')} {v['params']:,.0f} ({pct(v['params'], p['dense'])})" for k, v in removed.items()))
    lines.append("layer  attn block  KV groups  MLP block  channels   params kept")
    for r in acc["layers"]:
        lines.append(f"{r['layer']:>5}  {'kept' if r['attn_block'] else 'REMOVED':>10}  "
                     f"{r['kv_groups']:>4}/{r['kv_groups_dense']:<4} "
                     f"{'kept' if r['mlp_block'] else 'REMOVED':>10}  {r['channels']:>5}/{r['channels_dense']:<5} "
                     f"{pct(r['params'], r['params_dense']):>8}")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_layer_widths(before: SearchSpace, after: SearchSpace, path: str | os.PathLike,
                      title: str = "") -> None:
    """Bar chart of the kept fraction of KV groups and MLP channels per layer (PNG)."""
    plt = _pyplot()
    layers = range(before.num_layers)
    attn = [b.num_kv_groups / a.num_kv_groups for a, b in zip(before.layers, after.layers)]
    mlp = [b.intermediate_size / a.intermediate_size for a, b in zip(before.layers, after.layers)]
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * before.num_layers), 3.5))
    width = 0.4
    ax.bar([i - width / 2 for i in layers], attn, width, label="KV groups kept")
    ax.bar([i + width / 2 for i in layers], mlp, width, label="MLP channels kept")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("fraction kept")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(curves: dict[str, Sequence[float]], path: str | os.PathLike, ylabel: str, title: str = "") -> None:
    """Line plot of named series against the step index (PNG)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, values in curves.items():
        ax.plot(range(len(values)), values, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
