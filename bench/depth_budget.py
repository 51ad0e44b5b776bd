"""Width vs depth vs joint policy-gradient pruning under one parameter budget (docs/results/depth_budget.md).

For each sparsity (fraction of the prunable q/k/v/o/gate/up/down parameters removed) it runs four
searches on the same calibration batches and evaluates their final masks on held-out text with both
perplexity protocols (128- and 2048-token windows):

* ``width, separate``: the paper's budgets (the same fraction of KV groups and of MLP channels);
* ``width, params``: KV groups and channels under one parameter budget;
* ``depth``: whole attention and MLP blocks under one parameter budget;
* ``width+depth``: all four unit kinds under one parameter budget;

and two depth baselines from the block influence of ShortGPT (1 − cos across a block): the same
numbers of attention and MLP blocks as the depth search removed, and whole decoder layers (ShortGPT)
removing the number of layers closest to the budget. Masks are evaluated through the masked forward,
which equals the physically pruned model (tests/core/test_removal.py). Rows go to the JSON file beside
``--out`` after every row; ``--resume`` continues it.

    python bench/depth_budget.py --sparsity 0.2 0.3 0.5 --steps 20 --windows-128 64 --windows-2048 4 \
        --out docs/results/depth_budget.md --notes docs/results/depth_budget_notes.md
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import time
from pathlib import Path

import torch
from _common import ResultFile, command_line, machine_lines, markdown_table, masked_perplexity, settings_of

from pg_pruning_plugin import (
    PolicyGradientSearch,
    SearchConfig,
    SearchSpace,
    UnitValues,
    calibration_blocks,
    load_model,
)
from pg_pruning_plugin.resources.files import write_atomic
from pg_pruning_plugin.resources.text import source_blocks
from pg_pruning_plugin.scoring.baselines import block_influence_masks, layer_influence_masks
from pg_pruning_plugin.scoring.metrics import block_influence
from pg_pruning_plugin.search.costs import budget_accounting

SEARCHES = {  # label -> SearchConfig overrides
    "width, separate budgets (paper)": {},
    "width, one parameter budget": {"cost": "params"},
    "depth (blocks), parameter budget": {"granularity": "depth"},
    "width+depth, parameter budget": {"granularity": "width+depth"},
}


def evaluate(model, space, masks, held_out: dict[int, torch.Tensor]) -> dict[str, float]:
    """Both protocols as ``evaluation.perplexity`` runs them."""
    return {f"ppl@{n}": masked_perplexity(model, space, masks, blocks) for n, blocks in held_out.items()}


def describe(space, masks, seq_len: int) -> dict:
    acc = budget_accounting(space, masks, seq_len)
    p = acc["prunable_params"]
    blocks = (masks.attn_blocks, masks.mlp_blocks) if masks.has_blocks else (None, None)
    return {
        "params_removed": 1 - p["kept"] / p["dense"],
        "flops_removed": 1 - acc["flops_per_token"]["kept"] / acc["flops_per_token"]["dense"],
        "attn_blocks_removed": int((blocks[0] == 0).sum()) if blocks[0] is not None else 0,
        "mlp_blocks_removed": int((blocks[1] == 0).sum()) if blocks[1] is not None else 0,
        "layers_removed": int(((blocks[0] == 0) & (blocks[1] == 0)).sum()) if blocks[0] is not None else 0,
        "removed_by": {k: v["params"] / p["dense"] for k, v in acc["removed_by"].items()},
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.2, 0.3, 0.5])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--init", default="wanda-sp")
    p.add_argument("--init-batches", type=int, default=4)
    p.add_argument("--windows-128", type=int, default=128, help="held-out 128-token windows")
    p.add_argument("--windows-2048", type=int, default=8, help="held-out 2048-token windows")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=Path, required=True, help="markdown file; the JSON record is written beside it")
    p.add_argument("--notes", type=Path, default=None, help="markdown appended under the table (hand-written reading)")
    p.add_argument("--resume", action="store_true", help="continue the JSON record beside --out (same settings)")
    p.add_argument("--render-only", action="store_true",
                   help="rewrite --out from its JSON record (e.g. after editing --notes) without measuring")
    return p


def _settings(args) -> dict:
    return settings_of(args, "out", "notes", "resume", "render_only")


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    record = args.out.with_suffix(".json")
    if args.render_only:
        saved = json.loads(record.read_text())
        settings = saved.get("settings") or _settings(parser().parse_args(shlex.split(saved["command"])[2:]))
        write(args.out, args.notes, saved | {"settings": settings})
        return
    torch.manual_seed(args.seed)
    results = ResultFile(record, _settings(args), command_line(argv), args.device, resume=args.resume)

    model, tok = load_model(args.model, device=args.device)
    space = SearchSpace.from_model(model)
    calib = calibration_blocks(tok, seq_len=128, num_blocks=args.steps * args.batch_size, seed=args.seed)
    held_out = {128: source_blocks(tok, "wiki-vital", "eval", 128, max_blocks=args.windows_128),
                2048: source_blocks(tok, "wiki-vital", "eval", 2048, max_blocks=args.windows_2048)}

    def add(row: dict) -> None:  # after every row: an interrupted run keeps what it measured
        logging.info("%s", row)
        results.add(row)
        write(args.out, args.notes, results.data)

    if not results.has(method="dense"):
        t0 = time.perf_counter()
        add({"sparsity": 0.0, "method": "dense", **evaluate(model, space, UnitValues.full(space, 1.0), held_out),
             "params_removed": 0.0, "flops_removed": 0.0, "seconds": time.perf_counter() - t0})
    influence = block_influence(model, space, [calib[i * args.batch_size:(i + 1) * args.batch_size]
                                               for i in range(args.init_batches)], progress=False)
    for sparsity in args.sparsity:
        for label, overrides in SEARCHES.items():
            if results.has(sparsity=sparsity, method=label):
                continue
            config = SearchConfig(preset="authors",
                                  sparsity=sparsity, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                                  init=args.init, init_batches=args.init_batches, execution="gather",
                                  seed=args.seed, checkpoint_every=10**9, **overrides)
            t = time.perf_counter()
            result = PolicyGradientSearch(model, calib, config).run(progress=False)
            add({"sparsity": sparsity, "method": label, "steps": args.steps, **describe(space, result.masks, 2048),
                 **evaluate(model, space, result.masks, held_out), "seconds": time.perf_counter() - t})
        depth = next(r for r in results.rows if r["sparsity"] == sparsity and r["method"].startswith("depth"))
        n_attn, n_mlp = depth["attn_blocks_removed"], depth["mlp_blocks_removed"]
        baselines = {
            f"block influence, same blocks as the depth search ({n_attn} attn + {n_mlp} MLP)":
                block_influence_masks(influence, space, n_attn, n_mlp),
            f"ShortGPT whole layers ({round(sparsity * space.num_layers)} layers)":
                layer_influence_masks(influence, space, round(sparsity * space.num_layers)),
        }
        for label, masks in baselines.items():
            if results.has(sparsity=sparsity, method=label):
                continue
            t = time.perf_counter()
            add({"sparsity": sparsity, "method": label, **describe(space, masks, 2048),
                 **evaluate(model, space, masks, held_out), "seconds": time.perf_counter() - t})


def write(out: Path, notes: Path | None, data: dict) -> None:
    """The markdown report of a JSON record."""
    s = data["settings"]
    rows = [[f"{r['sparsity']:.0%}", r["method"], f"{r['params_removed']:.1%}", f"{r['flops_removed']:.1%}",
             f"{r.get('attn_blocks_removed', 0)} / {r.get('mlp_blocks_removed', 0)}", r.get("layers_removed", 0),
             f"{r['ppl@128']:.2f}", f"{r['ppl@2048']:.2f}", f"{r['seconds']:.0f}"] for r in data["rows"]]
    lines = [
        "# Width, depth and joint pruning under one parameter budget (SmolLM2-135M)",
        "",
        "Command: " + " then ".join(f"`{c}`" for c in data.get("commands", [data.get("command")])) + "  ",
        *(machine_lines(data["machine"]) if "machine" in data else []),
        "",
        f"Search: {s['steps']} steps of 2 samples x {s['batch_size']} x 128 tokens of the wiki-vital calib split, lr "
        f"{s['lr']} (cosine), init {s['init']} for widths and the layer influence for both blocks of a layer, gather "
        f"execution. Held-out: wiki-vital eval split, {s['windows_128']} windows of 128 tokens and "
        f"{s['windows_2048']} of 2048 (128: exp of the mean batch cross-entropy, batch 8; 2048: token-weighted, "
        f"batch 4, as `pg-prune eval`). 'removed' columns: share of the prunable q/k/v/o/gate/up/down parameters "
        f"and of their forward FLOPs per token at 2048 tokens.",
        "",
        *markdown_table(["removed (target)", "method", "params removed", "FLOPs removed", "attn / MLP blocks removed",
                         "layers removed", "PPL@128", "PPL@2048", "wall s"], rows),
    ]
    extra = "\n" + notes.read_text() if notes is not None and notes.is_file() else ""
    write_atomic(out, "\n".join(lines) + "\n" + extra)


if __name__ == "__main__":
    main()
