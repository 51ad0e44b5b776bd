"""Markdown report of ``pg-prune bench`` runs (docs/results/speed.md): every JSON file of a folder side by side.

    python bench/speed_report.py docs/results/speed --out docs/results/speed.md

CPU runs come first; the hand-written analysis in ``FOLDER/NOTES.md`` opens the report when it exists.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import machine_lines

from pg_pruning_plugin.resources.files import write_atomic

# The speed targets the project set itself (docs/results/speed.md): (label, measured ratio key, threshold, direction)
TARGETS = (
    ("search step, gather execution, per sample vs dense forward", "step_speedup_gather", 1.4, ">="),
    ("search step, masked execution (K samples in one forward), per sample vs dense forward",
     "step_speedup_mask", 1.4, ">="),
    ("peak search memory vs plain inference memory", "memory_ratio", 1.1, "<="),
    ("decode throughput of a 50%-pruned model vs dense (batch 1)", "decode_speedup_b1", 1.6, ">="),
    ("decode throughput of a 50%-pruned model vs dense (batch 8)", "decode_speedup_b8", 1.6, ">="),
)


def _summary(result: dict) -> dict:
    """Ratios against the targets, from the raw numbers of one run."""
    out = {}
    if "search" in result:
        s = result["search"]["seconds"]
        k = result["search"]["samples"]
        dense = s["dense forward"]
        out["ones_overhead"] = s["masked forward, all-ones mask"] / dense - 1
        for e in ("mask", "gather"):
            out[f"step_speedup_{e}"] = dense / (s[f"search step ({k} samples), {e}"] / k)
    if "memory" in result:
        peak = result["memory"]["peak"]
        out["memory_ratio"] = min(peak[w]["peak_mib"] for w in ("mask", "gather")) / peak["inference"]["peak_mib"]
    if "inference" in result:
        rows = result["inference"]
        for b in (1, 8):
            dense = [r for r in rows if r["sparsity"] == 0 and r["batch_size"] == b]
            half = [r for r in rows if r["sparsity"] == 0.5 and r["batch_size"] == b]
            if dense and half:
                out[f"decode_speedup_b{b}"] = half[0]["decode_tok_s"] / dense[0]["decode_tok_s"]
    return out


def _render_run(r: dict) -> list[str]:
    lines = [f"## {r['device']} · {r['model']} · {r['dtype']}", "",
             f"Command: `{r['command']}`  ", f"Date: {r['date']}, {r['wall_seconds']:.0f} s wall  ",
             *machine_lines(r["machine"]), ""]
    if "note" in r:
        lines += [f"Note: {r['note']}", ""]
    summary = _summary(r)
    if "search" in r:
        s = r["search"]
        tokens = s["batch_size"] * s["seq_len"]
        dense = s["seconds"]["dense forward"]
        lines += [f"### Search throughput (batch {s['batch_size']} x {s['seq_len']} tokens, K = {s['samples']}, "
                  f"samples keep {s['sampled_kept_mlp']:.0%} of MLP channels and {s['sampled_kept_attn']:.0%} "
                  f"of KV groups)", "",
                  "| what | seconds | samples x tokens | tokens/s | per-sample speed vs dense forward |",
                  "|---|---:|---:|---:|---:|"]
        for name, sec in s["seconds"].items():
            n = s["samples"] if ("sample" in name and "all-ones" not in name) else 1
            lines.append(f"| {name} | {sec:.4f} | {n} x {tokens} | {n * tokens / sec:,.0f} | "
                         f"{(dense * n) / sec:.2f}x |")
        lines += ["", f"All-ones masked forward overhead vs dense: {summary['ones_overhead']:+.1%} (target within 5%).",
                  ""]
    if "memory" in r:
        mem = r["memory"]
        lines += [f"### Peak memory ({mem['method']})", "", "| workload | peak MiB | vs inference |", "|---|---:|---:|"]
        base = mem["peak"]["inference"]["peak_mib"]
        labels = {"inference": "plain inference forward", "mask": "search step, masked execution",
                  "gather": "search step, gather execution"}
        for w, v in mem["peak"].items():
            extra = f" (after loading: {v['after_load_mib']:.0f})" if "after_load_mib" in v else ""
            lines.append(f"| {labels[w]} | {v['peak_mib']:.0f}{extra} | {v['peak_mib'] / base:.2f}x |")
        lines.append("")
    if "inference" in r:
        rows = r["inference"]
        info = r["inference_setup"]
        lines += [f"### Pruned-model inference (`generate`, prompt {info['prompt_len']} tokens, "
                  f"{info['new_tokens']} new tokens, greedy; per-layer-uniform random masks, MLP widths rounded to "
                  f"{info['round_to']})", "",
                  "| sparsity | batch | params (M) | KV groups / MLP channels per layer | prefill tok/s | vs dense "
                  "| decode tok/s | vs dense |", "|---:|---:|---:|---|---:|---:|---:|---:|"]
        dense = {x["batch_size"]: x for x in rows if x["sparsity"] == 0}
        for x in rows:
            d = dense[x["batch_size"]]
            lines.append(f"| {x['sparsity']:.0%} | {x['batch_size']} | {x['params'] / 1e6:.1f} | "
                         f"{x['kv_groups']} / {x['mlp_channels']} | {x['prefill_tok_s']:,.0f} | "
                         f"{x['prefill_tok_s'] / d['prefill_tok_s']:.2f}x | {x['decode_tok_s']:,.1f} | "
                         f"{x['decode_tok_s'] / d['decode_tok_s']:.2f}x |")
        lines.append("")
    if "scaling" in r:
        sc = r["scaling"]
        lines += [f"### Search steps with several CPU processes ({sc['execution']} execution, one gloo group, "
                  f"{sc['threads_per_process']} thread per process; {sc['steps']} timed steps after a warm-up, "
                  f"median of {sc['rounds']} rounds that alternate the process counts)", "",
                  "| processes | candidates / sequences per rank | seconds per step | speedup | CPU seconds per step "
                  "(busiest rank) | every round (s/step) |", "|---:|---|---:|---:|---:|---|"]
        for world, seconds in sc["seconds_per_step"].items():
            split, cpu = sc["split"][world], sc.get("cpu_seconds_per_step", {}).get(world)
            share = "/".join(f"{c} x {n}" for c, n in dict.fromkeys(zip(split["candidates_per_rank"],
                                                                      split["sequences_per_rank"])))
            lines.append(f"| {world} | {share} | {seconds:.3f} | {sc['speedup'].get(world, float('nan')):.2f}x | "
                         f"{'-' if cpu is None else f'{cpu:.3f}'} | "
                         f"{', '.join(f'{x:.3f}' for x in sc['all_rounds'][world])} |")
        lines.append("")
    rows = [(label, summary[key], thr, op) for label, key, thr, op in TARGETS if key in summary]
    if rows:
        lines += ["### Targets", "", "| target | measured | met |", "|---|---:|---|"]
        for label, value, thr, op in rows:
            met = value >= thr if op == ">=" else value <= thr
            lines.append(f"| {label} {op} {thr}x | {value:.2f}x | {'yes' if met else 'no'} |")
        lines.append("")
    return lines


def render(results_dir: Path, out: Path) -> None:
    """Write ``out`` from every ``*.json`` run in ``results_dir`` (CPU runs first), after the
    hand-written analysis in ``results_dir/NOTES.md`` if there is one."""
    runs = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    runs.sort(key=lambda r: (r["device"] != "cpu", r["model"]))
    lines = ["# Speed and memory (`pg-prune bench`)", "",
             "Measured by `pg-prune bench` into the JSON files in "
             f"`{results_dir.as_posix()}` and rendered by `python bench/speed_report.py`; each section is one run, "
             "measured side by side in one process.", ""]
    notes = results_dir / "NOTES.md"
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    for r in runs:
        lines += _render_run(r)
    write_atomic(out, "\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results_dir", type=Path, help="folder of JSON files written by pg-prune bench --json")
    p.add_argument("--out", type=Path, required=True, help="markdown report")
    args = p.parse_args(argv)
    render(args.results_dir, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
