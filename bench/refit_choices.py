"""The refit's choices, measured on one mask: target, damping, calibration size; time and peak memory.

    python bench/refit_choices.py --method flap --sparsity 0.3 --json docs/results/refit_choices.json \\
        --out docs/results/refit_choices.md

The mask is a ``pg-prune compare`` baseline at one prunable-parameter budget (scoring/baselines.py),
chosen once on the first ``--calib-blocks`` calibration blocks; every row refits the same mask.
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    ResultFile,
    command_line,
    fmt,
    machine_lines,
    markdown_table,
    measured,
    run_or_render,
    settings_of,
)

from pg_pruning_plugin import load_model, prune_model  # noqa: E402
from pg_pruning_plugin.evaluation.perplexity import perplexity_on_blocks  # noqa: E402
from pg_pruning_plugin.refit import refit  # noqa: E402
from pg_pruning_plugin.resources.text import calibration_blocks, source_blocks  # noqa: E402
from pg_pruning_plugin.scoring.baselines import baseline_masks  # noqa: E402

# (label, refit method, target, damping, calibration blocks or None for --calib-blocks)
CHOICES = [
    ("no refit", "none", "pruned-input", 0.01, None),
    ("bias (sequential statistics)", "bias", "pruned-input", 0.01, None),
    ("lstsq, target: dense layer on the pruned inputs (default)", "lstsq", "pruned-input", 0.01, None),
    ("lstsq, target: the dense model's own outputs", "lstsq", "dense-input", 0.01, None),
    ("lstsq, damping 0.001", "lstsq", "pruned-input", 0.001, None),
    ("lstsq, damping 0.1", "lstsq", "pruned-input", 0.1, None),
    ("lstsq, 32 calibration blocks (4,096 tokens)", "lstsq", "pruned-input", 0.01, 32),
    ("lstsq, 512 calibration blocks (65,536 tokens)", "lstsq", "pruned-input", 0.01, 512),
]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M)")
    p.add_argument("--text", default="wiki-vital")
    p.add_argument("--method", default="flap", help="the baseline whose mask is refitted")
    p.add_argument("--sparsity", type=float, default=0.3, help="fraction of prunable parameters removed")
    p.add_argument("--calib-blocks", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--choices", nargs="+", type=int, default=list(range(len(CHOICES))), help="rows of CHOICES")
    p.add_argument("--windows-128", type=int, default=64)
    p.add_argument("--windows-2048", type=int, default=2)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--render-only", action="store_true")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> ResultFile:
    record = ResultFile(args.json, settings_of(args, "json", "out", "resume", "render_only", "choices"),
                        command_line(), resume=args.resume)
    dense, tokenizer = load_model(args.model) if args.model else load_model()
    pool = max([args.calib_blocks] + [c[4] or 0 for c in CHOICES])
    blocks = calibration_blocks(tokenizer, args.text, 128, pool, seed=args.seed)
    calib = blocks[: args.calib_blocks]
    held_out = {n: source_blocks(tokenizer, args.text, "eval", n, max_blocks=w)
                for n, w in ((128, args.windows_128), (2048, args.windows_2048)) if w}
    masks = baseline_masks(dense, args.method, args.sparsity, batches=list(calib.split(8)), progress=False).masks
    for index in args.choices:
        label, method, target, damping, n_blocks = CHOICES[index]
        if record.has(choice=label):
            continue
        model = copy.deepcopy(dense)
        run_refit = functools.partial(refit, model, masks, blocks[: n_blocks or args.calib_blocks], method,
                                      damping=damping, target=target, progress=False)
        report, _, peak_mib = measured(run_refit, torch.device("cpu"))
        prune_model(model, masks)
        row = {"choice": label, "method": method, "target": target, "damping": damping,
               "tokens": report.tokens, "refit_seconds": report.seconds, "peak_mib": peak_mib,
               "statistics_mib": report.peak_statistics_mib, "errors": report.mean_errors()}
        for n, held in held_out.items():
            row[f"ppl{n}"] = perplexity_on_blocks(model, held, batch_size=8 if n <= 128 else 4,
                                                  reduction="batch" if n <= 128 else "token", progress=False)[0]
        record.add(row)
        del model
    return record


def render(record: dict, out: Path) -> None:
    s = record["settings"]
    lines = ["# Refit choices on one mask", "",
             f"Every number below was produced by `{record['commands'][-1]}`  ", *machine_lines(record["machine"]), "",
             f"The mask: `{s['method']}` at {100 * s['sparsity']:.0f} % of the prunable parameters removed, chosen on "
             f"{s['calib_blocks']} calibration blocks of 128 tokens ({s['text']}, seed {s['seed']}). Held-out "
             f"PPL@128 on {s['windows_128']} windows, PPL@2048 on {s['windows_2048']}. Peak memory: above the memory "
             f"in use before the refit (the process's peak RSS); statistics: the largest H (and cross terms) held at "
             f"once.", ""]
    rows = [(r["choice"], f"{r['tokens']:,}", fmt(r.get("ppl128")), fmt(r.get("ppl2048")),
             fmt(r["refit_seconds"], ".0f"), fmt(r["peak_mib"], ".0f"), fmt(r["statistics_mib"], ".1f"))
            for r in record["rows"]]
    lines += markdown_table(["refit", "calibration tokens", "PPL@128", "PPL@2048", "time (s)", "peak memory (MiB)",
                             "statistics (MiB)"], rows, "lrrrrrr")
    out.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    return run_or_render(parse(argv), run, render)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
