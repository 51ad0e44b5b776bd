"""Markdown report and plot of a ``pg-prune compare`` run (docs/results/quality.md).

    python bench/quality_report.py docs/results/quality.json --out docs/results/quality.md \
        --plot docs/results/quality.png --notes docs/results/quality_notes.md
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

from _common import fmt, machine_lines

from pg_pruning_plugin.cli.compare import SEARCH_METHODS, STATISTICS_KEY
from pg_pruning_plugin.resources.files import atomic_file, write_atomic

LABELS = {
    "dense": "dense",
    "random": "random (global)",
    "magnitude": "magnitude, TP group L2² sum (global)",
    "wanda-sp": "Wanda-sp (per layer)",
    "flap": "FLAP, per-type adaptive + bias",
    "flap-joint": "FLAP AL-AM, joint + bias",
    "taylor": "Taylor, first-order w·grad (global)",
    "pg-wanda-sp": "PG search, Wanda-sp init",
    "pg-constant": "PG search, constant init",
}


def _panel_value(key: str, row: dict):
    return row.get("zero_shot", {}).get("mean") if key == "zero_shot" else row.get(key)


def plot(rows: list[dict], path: Path) -> None:
    """PPL@128 and PPL@2048 (log scale) and mean zero-shot accuracy against the removed fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next((r for r in rows if r["method"] == "dense"), None)
    panels = [("ppl128", "PPL, 128-token windows"), ("ppl2048", "PPL, 2048-token windows")]
    if any("zero_shot" in r for r in rows):
        panels.append(("zero_shot", "mean zero-shot acc"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    methods = [m for m in LABELS if m != "dense" and any(r["method"] == m for r in rows)]
    for ax, (key, title) in zip(axes[0], panels):
        value = functools.partial(_panel_value, key)
        for m in methods:
            pts = sorted((r["ratio"], value(r)) for r in rows if r["method"] == m and value(r) is not None)
            if pts:
                search = m in SEARCH_METHODS
                ax.plot([100 * x for x, _ in pts], [y for _, y in pts], marker="*" if search else "o",
                        markersize=10 if search else 6, linewidth=2.5 if search else 1.2, label=LABELS[m])
        if dense is not None and value(dense) is not None:
            ax.axhline(value(dense), color="black", linestyle="--", linewidth=1, label="dense")
        if key != "zero_shot":
            ax.set_yscale("log")
        ax.set_xlabel("% of KV groups and MLP channels removed")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _verdicts(rows: list[dict]) -> list[str]:
    """Per ratio: the best baseline and the best search row on PPL@128."""
    out = []
    for ratio in sorted({r["ratio"] for r in rows if r["method"] != "dense"}):
        at = [r for r in rows if r["ratio"] == ratio and r.get("ppl128") is not None]
        base = [r for r in at if r["method"] not in SEARCH_METHODS]
        search = [r for r in at if r["method"] in SEARCH_METHODS]
        if not base or not search:
            continue
        b = min(base, key=lambda r: r["ppl128"])
        s = min(search, key=lambda r: r["ppl128"])
        verdict = "beats" if s["ppl128"] < b["ppl128"] else "does NOT beat"
        out.append(f"- {ratio:.0%}: best search row ({LABELS[s['method']]}, {s['ppl128']:.2f}) {verdict} the best "
                   f"baseline ({LABELS[b['method']]}, {b['ppl128']:.2f}) on PPL@128.")
    return out


def _mark_reused(rows: list[dict]) -> None:
    """Rows of one run without the ``reused_statistics`` field get it from the execution order."""
    seen: set[str] = set()
    for r in rows:
        key = STATISTICS_KEY.get(r["method"])
        r.setdefault("reused_statistics", key in seen)
        if key:
            seen.add(key)


def render(state: dict, out: Path, plot_path: Path | None, notes: Path | None = None) -> None:
    """Write the markdown report (and the plot) from the saved state."""
    s, ev, rows = state["settings"], state["eval"], [dict(r) for r in state["rows"]]
    _mark_reused(rows)
    order = {k: i for i, k in enumerate(LABELS)}
    rows = sorted(rows, key=lambda r: (r["ratio"], order.get(r["method"], 99)))
    dense = next((r for r in rows if r["method"] == "dense"), None)
    zs = bool(s["tasks"])
    lines = [
        "# Quality: baselines vs the policy-gradient search (`pg-prune compare`)", "",
        "Every number below was produced by " + " then ".join(f"`{c}`" for c in state["commands"])
        + (" (`--resume` keeps the earlier rows; the settings are checked to be identical)"
           if len(state["commands"]) > 1 else "") + "; rendered by `python bench/quality_report.py`  ",
        *machine_lines(state["machine"])[:1],
        machine_lines(state["machine"])[1] + f"; dtype {s['dtype']}; total wall time "
        f"{state.get('wall_seconds', 0) / 60:.0f} min (on a shared machine wall times include contention)", "",
        "## Setup", "",
        f"- Model: `{s['model']}`. Budget: the same fraction of KV groups and of MLP channels removed by every "
        f"method (the search's budget); 'prunable removed' is the resulting fraction of q/k/v/o/gate/up/down weights.",
        f"- Calibration (every data-driven method, and the search): {s['calib_blocks']} blocks x "
        f"{s['calib_seq_len']} tokens of `{s['calib_text']}` (calib split, sampled with seed {s['seed']}) = "
        f"{ev['calib_tokens']:,} tokens, in batches of {s['batch_size']}. The search cycles over the same blocks "
        f"({s['steps']} steps x {s['batch_size']} blocks x K={s['samples']} samples, lr {s['lr']}, "
        f"init mapping {s['init_mapping']}).",
        f"- Seeds: {s['seed']} for the calibration sample, the random baseline and the search.",
        f"- Held-out perplexity on `{s['eval_text']}` (eval split, no document shared with calib): "
        f"PPL@128 = first {ev['ppl128_windows']} non-overlapping 128-token windows, exp(mean of batch-mean CE), "
        f"batch 8; PPL@2048 = first {ev['ppl2048_windows']} 2048-token windows, exp(token-weighted CE). "
        f"Never compare across protocols.",
        (f"- Zero-shot: lm-eval 0-shot accuracy (acc) on {', '.join(s['tasks'])}, first {s['limit']} documents "
         f"per task (`--limit {s['limit']}`)." if zs else "- Zero-shot: skipped in this run (`--limit 0`)."),
        "- Time and peak memory: the selection only (scores and masks; for the search its initial metric and "
        "all steps), not pruning or evaluation. Peak memory is above the memory in use before the method "
        "started (CPU: sampled RSS; GPU: max_memory_allocated). *: the ratio-independent statistics "
        "(magnitudes, FLAP statistics, Taylor gradients) were computed once per run, by the first row of that kind; "
        "the starred row's time and memory exclude them.", "",
        "## Results", "",
        "| removed | method | structure | KV groups kept | MLP channels kept | prunable removed | PPL@128 | PPL@2048 |"
        + (" mean zero-shot acc |" if zs else "") + " time (s) | peak mem (MiB) |",
        "|---:|---|---|---:|---:|---:|---:|---:|" + ("---:|" if zs else "") + "---:|---:|",
    ]
    for r in rows:
        zero = f" {fmt(r.get('zero_shot', {}).get('mean'), '.4f')} |" if zs else ""
        lines.append(
            f"| {r['ratio']:.0%} | {LABELS.get(r['method'], r['method'])} | {r.get('structure', '-')} | "
            f"{r['kv_groups']} | {r['mlp_channels']} | {fmt(r.get('prunable_removed', 0.0), '.1%')} | "
            f"{fmt(r.get('ppl128'))} | {fmt(r.get('ppl2048'))} |{zero} "
            f"{fmt(r.get('seconds'), '.0f')}{'*' if r['reused_statistics'] else ''} | "
            f"{fmt(r.get('peak_mib'), '.0f')} |")
    if zs:
        lines += ["", "### Zero-shot accuracy per task", "",
                  "| removed | method | " + " | ".join(s["tasks"]) + " | mean |",
                  "|---:|---|" + "---:|" * (len(s["tasks"]) + 1)]
        for r in rows:
            z = r.get("zero_shot", {})
            lines.append(f"| {r['ratio']:.0%} | {LABELS.get(r['method'], r['method'])} | "
                         + " | ".join(fmt(z.get(t), ".3f") for t in s["tasks"]) + f" | {fmt(z.get('mean'), '.4f')} |")
    search_rows = [r for r in rows if "first_loss" in r]
    if search_rows:
        lines += ["", "Search loss (mean sample CE over the first / last 10 steps): " + "; ".join(
            f"{LABELS[r['method']]} at {r['ratio']:.0%}: {r['first_loss']:.3f} / {r['last_loss']:.3f}"
            for r in search_rows) + "."]
    verdicts = _verdicts(rows)
    if verdicts:
        lines += ["", "## Does the search beat every baseline on held-out PPL@128?", "", *verdicts]
    if dense is not None and plot_path is not None:
        plot(rows, plot_path)
        lines += ["", f"![quality plot]({plot_path.name})"]
    if notes is not None:
        lines += ["", "## Notes (written by hand, not produced by this command)", "", notes.read_text().strip()]
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
