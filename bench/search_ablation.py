"""The search-quality ablation: each lever of the search alone and together, at one budget, same data.

Levers (docs/results/search_ablation.md):
  1 same-batch baseline (leave-one-out over the K samples)       units: ``estimator="loo"``
  2 low-dimensional policy (per-layer widths, level transfers)   ``preset="allocation"``
  3 sampling next to the deployed mask                           units: ``band``; allocation: inherent
  4 incumbent on held-in blocks                                  ``incumbent_every``
  5 KL to the dense model instead of cross-entropy               ``loss="kl"``
  6 candidates scored with compensated weights                   ``loop_refit`` ("bias"; allocation also "lstsq")
and, for every variant, the final mask with and without the least-squares refit (refit/).

Every variant starts from the same model and uses the same calibration blocks (the data of the
refit too) and the same number of steps; held-out perplexity on the eval split of ``--text``.

    python bench/search_ablation.py --sparsity 0.3 --steps 40 --json docs/results/search_ablation.json \\
        --out docs/results/search_ablation.md --notes docs/results/search_ablation_notes.md
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    ResultFile,
    command_line,
    fmt,
    machine_lines,
    markdown_table,
    notes_section,
    run_or_render,
    settings_of,
)

from pg_pruning_plugin import PolicyGradientSearch, SearchConfig, load_model, prune_model  # noqa: E402
from pg_pruning_plugin.evaluation.perplexity import perplexity_on_blocks  # noqa: E402
from pg_pruning_plugin.refit import refit  # noqa: E402
from pg_pruning_plugin.resources.text import calibration_blocks, source_blocks  # noqa: E402

UNITS = dict(preset="authors", lr=1e-2, init_mapping="mask", execution="gather", max_epochs=0)  # 100-step CLI setup
ALLOCATION = dict(preset="allocation")
# name -> (levers, SearchConfig settings); "start" rows take the allocation's reference widths with no step.
VARIANTS: dict[str, tuple[str, dict]] = {
    "units (per-unit Bernoulli, EMA baseline)": ("", UNITS),
    "units + leave-one-out baseline": ("1", UNITS | dict(estimator="loo")),
    "units + band 5 %": ("3", UNITS | dict(band=0.05)),
    "units + incumbent": ("4", UNITS | dict(incumbent_every=5)),
    "units + KL": ("5", UNITS | dict(loss="kl")),
    "units + bias in the loop": ("6", UNITS | dict(loop_refit="bias")),
    "units + all of 1, 3-6": ("1,3,4,5,6", UNITS | dict(estimator="loo", band=0.05, incumbent_every=5, loss="kl",
                                                        loop_refit="bias")),
    "allocation start (OBS ranks, uniform widths)": ("start", ALLOCATION),
    "allocation, CE, plain weights, no incumbent": ("2,3", ALLOCATION | dict(loss="ce", loop_refit="none",
                                                                            incumbent_every=0)),
    "allocation + least squares in the loop": ("2,3,6", ALLOCATION | dict(loss="ce", incumbent_every=0)),
    "allocation + bias in the loop + KL + incumbent": ("2-5,6b", ALLOCATION | dict(loop_refit="bias")),
    "allocation + least squares + KL": ("2,3,5,6", ALLOCATION | dict(incumbent_every=0)),
    "allocation + least squares + KL + incumbent (default)": ("2-6", ALLOCATION),
}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M)")
    p.add_argument("--text", default="wiki-vital")
    p.add_argument("--sparsity", type=float, default=0.3, help="fraction of prunable parameters removed")
    p.add_argument("--steps", type=int, default=60, help="search steps of every variant")
    p.add_argument("--calib-blocks", type=int, default=128, help="128-token calibration blocks (search and refit)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME")
    p.add_argument("--refits", nargs="+", default=["none", "lstsq"], choices=["none", "bias", "lstsq"])
    p.add_argument("--windows-128", type=int, default=64)
    p.add_argument("--windows-2048", type=int, default=2)
    p.add_argument("--json", type=Path, required=True, help="record file (JSON rows)")
    p.add_argument("--out", type=Path, default=None, help="markdown report")
    p.add_argument("--notes", type=Path, default=None, help="markdown appended under the table (hand-written reading)")
    p.add_argument("--resume", action="store_true", help="continue the record file")
    p.add_argument("--render-only", action="store_true", help="only write --out from --json")
    return p.parse_args(argv)


def _masks(model, calib, name: str, settings: dict, sparsity: float, steps: int):
    config = SearchConfig(sparsity=sparsity, steps=steps, **settings)
    search = PolicyGradientSearch(model, calib, config)
    start = time.perf_counter()
    if VARIANTS[name][0] == "start":
        search._setup(progress=True)
        return search.table.masks(search.reference), time.perf_counter() - start
    result = search.run()
    return result.masks, result.seconds


def run(args: argparse.Namespace) -> ResultFile:
    settings = settings_of(args, "json", "out", "notes", "resume", "render_only", "variants", "refits")
    record = ResultFile(args.json, settings, command_line(), resume=args.resume)
    dense, tokenizer = load_model(args.model) if args.model else load_model()
    calib = calibration_blocks(tokenizer, args.text, 128, args.calib_blocks, seed=args.seed)
    held_out = {n: source_blocks(tokenizer, args.text, "eval", n, max_blocks=w)
                for n, w in ((128, args.windows_128), (2048, args.windows_2048)) if w}

    def evaluate(model) -> dict:
        return {f"ppl{n}": perplexity_on_blocks(model, blocks, batch_size=8 if n <= 128 else 4,
                                                reduction="batch" if n <= 128 else "token", progress=False)[0]
                for n, blocks in held_out.items()}

    if not record.has(variant="dense"):
        record.add({"variant": "dense", "levers": "", "refit": "-", **evaluate(dense)})
    for name in args.variants:
        if all(record.has(variant=name, refit=r) for r in args.refits):
            continue
        levers, settings = VARIANTS[name]
        masks, seconds = _masks(dense, calib, name, settings, args.sparsity, args.steps)
        for method in args.refits:
            if record.has(variant=name, refit=method):
                continue
            model = copy.deepcopy(dense)
            report = refit(model, masks, calib, method)
            prune_model(model, masks)
            record.add({"variant": name, "levers": levers, "refit": method, "search_seconds": seconds,
                        "refit_seconds": report.seconds, "kv_groups": int(masks.attn.sum()),
                        "channels": int(masks.mlp.sum()), **evaluate(model)})
            del model
    return record


def render(record: dict, out: Path, notes: Path | None = None) -> None:
    s = record["settings"]
    rows = record["rows"]
    dense = next(r for r in rows if r["variant"] == "dense")
    lines = [
        "# Search ablation: each lever alone and together",
        "",
        "Every number below was produced by these commands (one record, continued with `--resume`):",
        "",
        *(f"    {command}" for command in record["commands"]),
        "",
        *machine_lines(record["machine"]),
        "",
        f"SmolLM2-135M, {100 * s['sparsity']:.0f} % of the prunable parameters removed, {s['steps']} steps per "
        f"search, the same {s['calib_blocks']} calibration blocks of 128 tokens ({s['text']}, seed {s['seed']}) for "
        f"every search and every refit. Held-out perplexity: PPL@128 = {s['windows_128']} windows of 128 tokens "
        f"(batch mean), PPL@2048 = {s['windows_2048']} windows of 2048 tokens (token weighted). Dense: "
        f"{fmt(dense.get('ppl128'))} / {fmt(dense.get('ppl2048'))}.",
        "",
        "Levers: 1 same-batch baseline, 2 low-dimensional policy, 3 sampling next to the deployed mask, "
        "4 incumbent, 5 KL to the dense model, 6 compensated weights in the loop (6b: FLAP's bias).",
        "",
    ]
    table = [(r["variant"], r["levers"], r["refit"], r["kv_groups"], r["channels"], fmt(r.get("ppl128")),
              fmt(r.get("ppl2048")), fmt(r["search_seconds"], ".0f"), fmt(r["refit_seconds"], ".0f"))
             for r in rows if r["variant"] != "dense"]
    lines += markdown_table(["variant", "levers", "final refit", "KV groups kept", "channels kept", "PPL@128",
                             "PPL@2048", "search (s)", "refit (s)"], table, "lllrrrrrr")
    lines += notes_section(notes)
    out.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    args = parse(argv)
    if args.notes is not None and not args.notes.is_file():
        raise SystemExit(f"--notes {args.notes} does not exist")
    return run_or_render(args, run, functools.partial(render, notes=args.notes))


if __name__ == "__main__":
    sys.exit(main())
