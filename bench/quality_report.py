"""Markdown report and plot of a ``pg-prune compare`` run (docs/results/quality.md).

    python bench/quality_report.py docs/results/quality.json --out docs/results/quality.md \
        --plot docs/results/quality.png --notes docs/results/quality_notes.md

The report: the dense row; one table per ratio with every method × refit option; the best refit of
every method per ratio; the search against the best baseline; a plot of PPL@128 against the ratio
(each method with its best refit, dashed without refit); zero-shot accuracy with standard errors for
the rows that have it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import fmt, machine_lines, markdown_table, notes_section

from pg_pruning_plugin.cli.compare import SEARCH_PREFIX, ZERO_SHOT_ROLES, is_search, zero_shot_targets
from pg_pruning_plugin.refit import REFIT_METHODS
from pg_pruning_plugin.resources.files import atomic_file, write_atomic
from pg_pruning_plugin.scoring.baselines import STRUCTURES

LABELS = {
    "random": "random",
    "magnitude": "magnitude (TP group L2² sum)",
    "taylor": "Taylor (first-order w·grad)",
    "wanda-sp": "Wanda-sp, per layer",
    "wanda-sp-global": "Wanda-sp, global",
    "flap": "FLAP, per-type adaptive",
    "flap-joint": "FLAP AL-AM, joint",
    "shortgpt": "ShortGPT, whole layers",
    "wanda-sp-units": "Wanda-sp, per-layer unit counts (not param-matched)",
}
ORDER = {m: i for i, m in enumerate(LABELS)}
# How each structure of scoring/baselines.py meets the parameter budget (its module docstring has the tolerances).
BUDGET_RULES = {
    "global": "the count rule's fraction of KV groups over all layers, then the MLP channels over all layers that "
              "bring the removed parameters nearest to the target (within half a channel)",
    "per-layer": "in every layer the count rule's KV groups and the channels that bring that layer's removed "
                 "parameters nearest to the target (within half a channel per layer)",
    "AL-AM": "one ranking of KV groups and channels, kept best first while they fit (at most one channel over)",
    "layers": "round(ratio × layers) whole decoder layers (exact when that is an integer)",
    "per-layer-units": "the count rule's fraction of KV groups and of channels in every layer (removes less where "
                       "a layer's few KV groups round down)",
}


def label(method: str) -> str:
    if is_search(method):
        return f"PG search, {method.removeprefix(SEARCH_PREFIX)} configuration"
    return LABELS.get(method, method)


def _methods(rows: list[dict]) -> list[str]:
    """Methods in report order: baselines as in :data:`LABELS`, then the search configurations."""
    found = dict.fromkeys(r["method"] for r in rows if r["method"] != "dense")
    return sorted(found, key=lambda m: (is_search(m), ORDER.get(m, len(ORDER)), m))


def _best(rows: list[dict], method: str, ratio: float, key: str = "ppl128") -> dict | None:
    """The row of ``method`` at ``ratio`` with the lowest ``key`` over its refit options."""
    at = [r for r in rows if r["method"] == method and r["ratio"] == ratio and r.get(key) is not None]
    return min(at, key=lambda r: r[key]) if at else None


def _row(rows: list[dict], method: str, ratio: float, refit: str) -> dict | None:
    return next((r for r in rows if r["method"] == method and r["ratio"] == ratio and r["refit"] == refit), None)


def plot(rows: list[dict], ratios: list[float], dense: dict | None, path: Path) -> None:
    """PPL@128 (log scale) against the removed fraction: per method its best refit (solid) and no refit (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, method in enumerate(_methods(rows)):
        color, search = colors[i % len(colors)], is_search(method)
        best = [(x, _best(rows, method, x)) for x in ratios]
        best = [(100 * x, r["ppl128"]) for x, r in best if r is not None]
        plain = [(100 * x, _row(rows, method, x, "none")) for x in ratios]
        plain = [(x, r["ppl128"]) for x, r in plain if r is not None and r.get("ppl128") is not None]
        style = dict(color=color, marker="*" if search else "o", markersize=10 if search else 5)
        if best:
            ax.plot(*zip(*best), linewidth=2.5 if search else 1.4, label=f"{label(method)}, best refit", **style)
        if plain:
            ax.plot(*zip(*plain), linestyle="--", linewidth=1.0, alpha=0.7, **style)
    if dense is not None:
        ax.axhline(dense["ppl128"], color="black", linestyle=":", linewidth=1, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("% of prunable parameters removed")
    ax.set_ylabel("held-out PPL, 128-token windows")
    ax.set_title("solid: best refit per method; dashed: no refit")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _search_budget(rows: list[dict], method: str) -> str:
    """How a search configuration's budget reads the ratio (from its recorded ``SearchConfig``)."""
    config = next((r["search_config"] for r in rows if r["method"] == method and "search_config" in r), {})
    if config.get("cost"):
        return f"one budget in {config['cost']} over all layers and unit types (the ratio is that fraction removed)"
    return ("the same fraction of KV groups and of MLP channels over all layers (the count rule; exactly the parameter "
            "fraction whenever both counts are exact, as on SmolLM2 at 20/30/50 %)")


def _seconds(r: dict) -> str:
    return fmt(r.get("selection_seconds"), ".0f") + ("*" if r.get("reused_statistics") else "")


def _ratio_table(rows: list[dict], ratio: float) -> list[str]:
    body = []
    for method in _methods(rows):
        for refit in REFIT_METHODS:
            r = _row(rows, method, ratio, refit)
            if r is None:
                continue
            body.append([label(method), refit, fmt(r.get("ppl128")), fmt(r.get("ppl2048")),
                         fmt(r.get("prunable_removed"), ".2%"), r["kv_groups"], r["mlp_channels"], r.get("layers", "–"),
                         _seconds(r), fmt(r.get("refit_seconds"), ".0f"),
                         f"{fmt(r.get('selection_peak_mib'), '.0f')} / {fmt(r.get('refit_peak_mib'), '.0f')}"])
    return markdown_table(["method", "refit", "PPL@128", "PPL@2048", "prunable removed", "KV groups kept",
                           "MLP channels kept", "layers", "selection (s)", "refit (s)", "peak MiB (selection / refit)"],
                          body, "llrrrrrrrrr")


def _best_table(rows: list[dict], ratios: list[float]) -> list[str]:
    body = []
    for method in _methods(rows):
        cells = []
        for ratio in ratios:
            best, plain = _best(rows, method, ratio), _row(rows, method, ratio, "none")
            cells.append("–" if best is None else f"{fmt(best['ppl128'])} ({best['refit']}; none "
                         f"{fmt(plain.get('ppl128') if plain else None)})")
        body.append([label(method), *cells])
    return markdown_table(["method", *(f"{x:.0%}: PPL@128 (best refit; without)" for x in ratios)], body,
                          "l" + "r" * len(ratios))


def _verdicts(rows: list[dict], ratios: list[float]) -> list[str]:
    """Per ratio and protocol: the best search row against the best baseline row (each with its best refit)."""
    out = []
    for ratio in ratios:
        for key, name in (("ppl128", "PPL@128"), ("ppl2048", "PPL@2048")):
            at = [r for r in rows if r["ratio"] == ratio and r["method"] != "dense" and r.get(key) is not None]
            base = [r for r in at if not is_search(r["method"])]
            search = [r for r in at if is_search(r["method"])]
            if not base or not search:
                continue
            b, s = min(base, key=lambda r: r[key]), min(search, key=lambda r: r[key])
            verdict = "beats" if s[key] < b[key] else "does NOT beat"
            out.append(f"- {ratio:.0%}, {name}: the best search row ({label(s['method'])}, refit {s['refit']}, "
                       f"{s[key]:.2f}) {verdict} the best baseline ({label(b['method'])}, refit {b['refit']}, "
                       f"{b[key]:.2f}); ratio {s[key] / b[key]:.2f}.")
    return out


def _pm(acc: float | None, stderr: float | None, spec: str = ".3f") -> str:
    return fmt(acc, spec) + ("" if stderr is None else f" ± {format(stderr, spec)}")


def _zero_shot_table(rows: list[dict], tasks: list[str]) -> list[str]:
    """Every row with zero-shot results, named by the role :func:`zero_shot_targets` gives it now (a row
    measured as a target of an earlier, smaller run may have lost that role to a row added later), with
    the documents per task it was measured on (a resumed run may change ``--limit``)."""
    roles = {id(r): role for role, r in zero_shot_targets(rows, ZERO_SHOT_ROLES)}
    body = []
    for r in sorted((r for r in rows if "zero_shot" in r), key=lambda r: (r["ratio"], is_search(r["method"]))):
        z = r["zero_shot"]
        cells = [_pm(z["tasks"].get(t, {}).get("acc"), z["tasks"].get(t, {}).get("acc_stderr")) for t in tasks]
        body.append([f"{r['ratio']:.0%}", roles.get(id(r), "no longer the best"),
                     "dense" if r["method"] == "dense" else label(r["method"]), r["refit"], str(z["limit"]), *cells,
                     _pm(z.get("mean"), z.get("mean_stderr"), ".4f")])
    return markdown_table(["removed", "row", "method", "refit", "documents", *tasks, "mean"], body,
                          "rlllr" + "r" * (len(tasks) + 1))


def render(state: dict, out: Path, plot_path: Path | None, notes: Path | None = None) -> None:
    """Write the markdown report (and the plot) from the saved state."""
    s, ev, rows = state["settings"], state["eval"], list(state["rows"])
    dense = next((r for r in rows if r["method"] == "dense"), None)
    ratios = sorted({r["ratio"] for r in rows if r["method"] != "dense"})
    methods = _methods(rows)
    measured = [r["zero_shot"] for r in rows if "zero_shot" in r]
    tasks = list(dict.fromkeys(t for z in measured for t in z["tasks"]))  # over the rows: --tasks may change
    limits = " or ".join(str(n) for n in sorted({z["limit"] for z in measured}))
    machine = machine_lines(state["machine"])
    structures = sorted({STRUCTURES[m] for m in methods if m in STRUCTURES}, key=list(BUDGET_RULES).index)
    lines = [
        "# Quality: every method × every refit at one parameter budget (`pg-prune compare`)", "",
        "Every number below was produced by " + " then ".join(f"`{c}`" for c in state["commands"])
        + (" (`--resume` keeps the earlier rows; the settings are checked to be identical, except the zero-shot "
           "`--limit` and `--tasks`)"
           if len(state["commands"]) > 1 else "") + "; rendered by `python bench/quality_report.py`  ",
        machine[0], machine[1] + f"; dtype {s['dtype']}; total wall time {state.get('wall_seconds', 0) / 60:.0f} min "
        "(on a shared machine wall times include contention)", "",
        "## Setup", "",
        f"- Model: `{s['model']}`. **One currency**: every method removes the same fraction of the *prunable* "
        "parameters (the q/k/v/o/gate/up/down weights) and splits it between KV groups, MLP channels and layers "
        "as its structure does; 'prunable removed' is the fraction each row achieved. How each structure meets it:",
        *(f"  - {name} ({'; '.join(label(m) for m in methods if STRUCTURES.get(m) == name)}): {BUDGET_RULES[name]}."
          for name in structures),
        *(f"  - {label(m)}: {_search_budget(rows, m)}." for m in methods if is_search(m)),
        f"- **Calibration, the same for every method**: {s['calib_blocks']} blocks × {s['calib_seq_len']} tokens of "
        f"`{s['calib_text']}` (calib split, sampled with seed {s['seed']}) = {ev['calib_tokens']:,} tokens, in batches "
        f"of {s['batch_size']}. The data-driven baselines' statistics, the search's initial metric and steps (it "
        "cycles over these blocks) and every refit used exactly these blocks.",
        f"- **Seeds**: {s['seed']} for the calibration sample, the random baseline and the search.",
        f"- **Refit** (`pg_pruning_plugin.refit.refit`, applied to every method's masks alike): `none` (removal "
        "only), `bias` (FLAP's mean compensation of the removed channels, with statistics of the already pruned "
        f"layers), `lstsq` (least-squares reconstruction of o_proj/down_proj, damping {s['damping']} of the mean "
        "diagonal), layer by layer on the calibration blocks.",
        f"- Held-out perplexity on `{s['eval_text']}` (eval split, no document shared with calib): "
        f"PPL@128 = first {ev['ppl128_windows']} non-overlapping 128-token windows, exp(mean of batch-mean CE), "
        f"batch 8; PPL@2048 = first {ev['ppl2048_windows']} 2048-token windows, exp(token-weighted CE). "
        "Never compare across protocols.",
        "- Time and peak memory: 'selection' is the method's scores and masks (for the search its initial metric "
        "and all steps), 'refit' the refit alone; neither includes removal or evaluation. Peak memory is above the "
        "memory in use before the call (CPU: peak RSS; GPU: max_memory_allocated). *: the ratio-independent "
        "statistics (magnitudes, Taylor gradients, FLAP statistics, block influence; Wanda-sp per ratio) were "
        "computed by an earlier row and reused; the starred time excludes them.",
        (f"- Zero-shot: lm-eval 0-shot accuracy (acc) on {', '.join(tasks)}, first {limits} documents per "
         "task (the table's 'documents'), for the dense model, the best baseline row per ratio (lowest PPL@128 over "
         "methods and refits) and each search configuration with its best refit; ± is lm-eval's standard error of "
         "each task and sqrt(Σ se²)/T for the mean." if measured else "- Zero-shot: not measured (`--limit 0`)."),
        "", "## Dense model", "",
    ]
    if dense is not None:
        z = dense.get("zero_shot")
        lines += markdown_table(["parameters", "prunable", "PPL@128", "PPL@2048", "mean zero-shot acc"],
                                [[f"{dense['params']:,}", f"{dense['prunable_params']:,}", fmt(dense.get("ppl128")),
                                  fmt(dense.get("ppl2048")), _pm(z["mean"], z["mean_stderr"], ".4f") if z else "–"]],
                                "rrrrr")
    for ratio in ratios:
        lines += ["", f"## {ratio:.0%} of the prunable parameters removed", "", *_ratio_table(rows, ratio)]
    if ratios:
        lines += ["", "## Best refit per method", "", *_best_table(rows, ratios)]
    verdicts = _verdicts(rows, ratios)
    if verdicts:
        lines += ["", "## Does the search beat every baseline (each with its best refit)?", "", *verdicts]
    if dense is not None and plot_path is not None and ratios:
        plot(rows, ratios, dense, plot_path)
        lines += ["", f"![PPL@128 against the removed fraction]({plot_path.name})"]
    if measured:
        lines += ["", "## Zero-shot accuracy", "", *_zero_shot_table(rows, tasks)]
    search_rows = sorted((r for r in rows if "first_loss" in r and r["refit"] == "none"), key=lambda r: r["ratio"])
    if search_rows:
        lines += ["", "Search loss (mean sample loss over the first / last 10 steps): " + "; ".join(
            f"{label(r['method'])} at {r['ratio']:.0%}: {r['first_loss']:.3f} / {r['last_loss']:.3f}"
            for r in search_rows) + "."]
    lines += notes_section(notes)
    write_atomic(out, "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="JSON file written by pg-prune compare --results")
    p.add_argument("--out", type=Path, required=True, help="markdown report")
    p.add_argument("--plot", type=Path, default=None, help="PNG plot (linked from the report)")
    p.add_argument("--notes", type=Path, default=None,
                   help="markdown appended to the report under a 'not produced by this command' heading")
    args = p.parse_args(argv)
    if args.notes is not None and not args.notes.is_file():
        p.error(f"--notes {args.notes} does not exist")
    render(json.loads(args.results.read_text()), args.out, args.plot, args.notes)
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))


if __name__ == "__main__":
    main()
