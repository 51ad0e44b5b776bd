"""Held-out perplexity of the initial masks vs the mask after the policy-gradient search.

Measured for docs/results/search_vs_init.md.

Initial masks: the init metric's per-layer top-k (for ``--init wanda-sp`` this is the Wanda-sp
method, and the authors' init mask) and the global top-k of the initial keep-probabilities (what
the search would return after 0 steps). All masks are evaluated on the same model through the masked
forward (identical to the physically pruned model, see tests/core/test_removal.py). Rows go to the
JSON file beside ``--out``; the markdown table to ``--out``.

    python bench/search_vs_init.py --sparsity 0.3 0.5 --steps 300 --out docs/results/search_vs_init.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

from _common import ResultFile, command_line, machine_lines, markdown_table, masked_perplexity, settings_of

from pg_pruning_plugin import PolicyGradientSearch, SearchConfig, SearchSpace, UnitValues, hard_masks
from pg_pruning_plugin.resources.files import write_atomic
from pg_pruning_plugin.resources.models import load_model
from pg_pruning_plugin.resources.text import calibration_blocks, source_blocks


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.3, 0.5])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, nargs="+", default=[2e-3])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--init", default="wanda-sp")
    p.add_argument("--init-mapping", default="sigmap")
    p.add_argument("--init-batches", type=int, default=4)
    p.add_argument("--eval-windows", type=int, default=256, help="held-out 128-token windows (wiki-vital eval)")
    p.add_argument("--max-epochs", type=int, default=1, help="passes allowed over the calibration blocks")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=Path, required=True, help="markdown table; the JSON record is written beside it")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    results = ResultFile(args.out.with_suffix(".json"), settings_of(args, "out"), command_line(argv), args.device)

    model, tok = load_model(args.model, device=args.device)
    space = SearchSpace.from_model(model)
    per_epoch = -(-args.steps // args.max_epochs) * args.batch_size
    calib = calibration_blocks(tok, seq_len=128, num_blocks=per_epoch, seed=args.seed)
    held_out = source_blocks(tok, "wiki-vital", "eval", 128, max_blocks=args.eval_windows)
    results.data["dense_ppl"] = masked_perplexity(model, space, UnitValues.full(space, 1.0), held_out)
    results.data["eval_windows"] = held_out.shape[0]
    results.save()
    for sparsity in args.sparsity:
        for lr in args.lr:
            config = SearchConfig(preset="authors",
                                  sparsity=sparsity, steps=args.steps, lr=lr, batch_size=args.batch_size,
                                  samples_per_step=args.samples, init=args.init, init_mapping=args.init_mapping,
                                  init_batches=args.init_batches, max_epochs=args.max_epochs, seed=args.seed)
            search = PolicyGradientSearch(model, calib, config)
            init_probs = search.initial_probabilities(progress=False)
            uniform_init = hard_masks(init_probs, space, dataclasses.replace(config, global_budget=False))
            global_init = hard_masks(init_probs, space, config)
            t = time.perf_counter()
            result = search.run()
            seconds = time.perf_counter() - t
            expected_width = hard_masks(result.probs, space, dataclasses.replace(config, mask_rule="expected-width"))
            row = {
                "sparsity": sparsity, "lr": lr, "steps": args.steps, "batch": args.batch_size, "K": args.samples,
                "uniform_init_ppl": masked_perplexity(model, space, uniform_init, held_out),
                "init_ppl": masked_perplexity(model, space, global_init, held_out),
                "search_ppl": masked_perplexity(model, space, result.masks, held_out),
                "expected_width_ppl": masked_perplexity(model, space, expected_width, held_out),
                "search_seconds": seconds,
                "first_loss": sum(result.history["loss"][:10]) / 10,
                "last_loss": sum(result.history["loss"][-10:]) / 10,
            }
            logging.info("%s", json.dumps(row))
            results.add(row)
    text = "\n".join(report(results.data))
    print(text)
    write_atomic(args.out, text + "\n")


def report(data: dict) -> list[str]:
    rows = [[f"{r['sparsity']:.0%}", f"{r['lr']:g}", f"{r['steps']} x {r['batch']} x {r['K']}",
             f"{r['uniform_init_ppl']:.2f}", f"{r['init_ppl']:.2f}", f"{r['search_ppl']:.2f}",
             f"{r['expected_width_ppl']:.2f}", f"{r['first_loss']:.3f} / {r['last_loss']:.3f}",
             f"{r['search_seconds']:.0f} s"] for r in data["rows"]]
    return [f"dense held-out PPL: {data['dense_ppl']:.2f} ({data['eval_windows']} windows x 128 tokens, "
            "wiki-vital eval)",
            "",
            *markdown_table(["removed (attn and MLP units)", "lr", "steps x batch x K", "init metric, per-layer top-k",
                             "init probabilities, global top-k", "after search, global top-k",
                             "after search, expected width", "mean sample loss first/last 10 steps", "search time"],
                            rows),
            "", "command: `" + data["commands"][-1] + "`", *machine_lines(data["machine"])]


if __name__ == "__main__":
    main()
