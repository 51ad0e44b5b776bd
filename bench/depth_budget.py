"""Width vs depth vs joint policy-gradient pruning under one parameter budget (issue 7 benchmark).

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
which equals the physically pruned model (tests/test_depth_budget.py).

    python bench/depth_budget.py --sparsity 0.2 0.3 0.5 --steps 20 --windows-128 64 --windows-2048 4 \
        --out docs/results/depth_budget.md --notes docs/results/depth_budget_notes.md
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch_pruning
import transformers

from pg_pruning_plugin import PolicyGradientSearch, SearchConfig, SearchSpace, UnitMasks, UnitScores, masked
from pg_pruning_plugin.scoring.baselines import block_influence_masks, layer_influence_masks
from pg_pruning_plugin.search.budget import budget_accounting
from pg_pruning_plugin.resources.text import calibration_blocks, source_blocks
from pg_pruning_plugin.evaluation.perplexity import perplexity_on_blocks
from pg_pruning_plugin.scoring.metrics import block_influence
from pg_pruning_plugin.resources.models import load_model

SEARCHES = {  # label -> SearchConfig overrides
    "width, separate budgets (paper)": {},
    "width, one parameter budget": {"cost": "params"},
    "depth (blocks), parameter budget": {"granularity": "depth"},
    "width+depth, parameter budget": {"granularity": "width+depth"},
}


def evaluate(model, space, masks, held_out: dict[int, torch.Tensor]) -> dict[str, float]:
    """Both protocols as ``evaluation.perplexity`` runs them: 128 tokens batch-mean (batch 8), 2048 tokens
    token-weighted (batch 4)."""
    with masked(model, space, UnitMasks(**masks.as_dict())):
        return {f"ppl@{n}": perplexity_on_blocks(model, blocks, batch_size=8 if n <= 128 else max(1, 8192 // n),
                                                 reduction="batch" if n <= 128 else "token", progress=False)[0]
                for n, blocks in held_out.items()}


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


def main() -> None:
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
    p.add_argument("--out", type=Path, required=True, help="markdown file; a .json with the raw rows is written beside it")
    p.add_argument("--notes", type=Path, default=None, help="markdown appended under the table (hand-written reading)")
    p.add_argument("--render-only", action="store_true",
                   help="rewrite --out from its .json (e.g. after editing --notes) without measuring")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    if args.render_only:  # the settings shown are those of the recorded command
        saved = json.loads(args.out.with_suffix(".json").read_text())
        measured = p.parse_args(shlex.split(saved["command"])[2:])
        measured.out, measured.notes = args.out, args.notes
        write(measured, saved["rows"], saved["command"])
        return
    torch.manual_seed(args.seed)

    model, tok = load_model(args.model, device=args.device)
    space = SearchSpace.from_model(model)
    calib = calibration_blocks(tok, seq_len=128, num_blocks=args.steps * args.batch_size, seed=args.seed)
    held_out = {128: source_blocks(tok, "wiki-vital", "eval", 128, max_blocks=args.windows_128),
                2048: source_blocks(tok, "wiki-vital", "eval", 2048, max_blocks=args.windows_2048)}
    t0 = time.perf_counter()
    rows = [{"sparsity": 0.0, "method": "dense", **evaluate(model, space, _all_kept(space), held_out),
             "params_removed": 0.0, "flops_removed": 0.0, "seconds": time.perf_counter() - t0}]
    logging.info("dense: %s", rows[0])
    influence = block_influence(model, space, [calib[i * args.batch_size:(i + 1) * args.batch_size]
                                               for i in range(args.init_batches)], progress=False)
    for sparsity in args.sparsity:
        depth_masks = None
        for label, overrides in SEARCHES.items():
            config = SearchConfig(sparsity=sparsity, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                                  init=args.init, init_batches=args.init_batches, execution="gather",
                                  seed=args.seed, checkpoint_every=10**9, **overrides)
            t = time.perf_counter()
            result = PolicyGradientSearch(model, calib, config).run(progress=False)
            row = {"sparsity": sparsity, "method": label, "steps": args.steps,
                   **describe(space, result.masks, 2048), **evaluate(model, space, result.masks, held_out),
                   "seconds": time.perf_counter() - t}
            rows.append(row)
            logging.info("%s", row)
            write(args, rows)  # after every row: an interrupted run keeps what it measured
            if overrides.get("granularity") == "depth":
                depth_masks = row
        n_attn, n_mlp = depth_masks["attn_blocks_removed"], depth_masks["mlp_blocks_removed"]
        baselines = {
            f"block influence, same blocks as the depth search ({n_attn} attn + {n_mlp} MLP)":
                block_influence_masks(influence, space, n_attn, n_mlp),
            f"ShortGPT whole layers ({round(sparsity * space.num_layers)} layers)":
                layer_influence_masks(influence, space, round(sparsity * space.num_layers)),
        }
        for label, masks in baselines.items():
            t = time.perf_counter()
            row = {"sparsity": sparsity, "method": label, **describe(space, masks, 2048),
                   **evaluate(model, space, masks, held_out), "seconds": time.perf_counter() - t}
            rows.append(row)
            logging.info("%s", row)
            write(args, rows)


def _all_kept(space) -> UnitScores:
    return UnitScores(torch.ones(space.num_attn_units), torch.ones(space.num_mlp_units))


def write(args, rows: list[dict], command: str | None = None) -> None:
    command = command or "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    lines = [
        "# Width, depth and joint pruning under one parameter budget (SmolLM2-135M)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()} {platform.system()}, {torch.get_num_threads()} torch threads, device "
        f"{args.device}; torch {torch.__version__}, transformers {transformers.__version__}, torch-pruning "
        f"{torch_pruning.__version__}, Python {platform.python_version()}.",
        "",
        f"Search: {args.steps} steps of 2 samples x {args.batch_size} x 128 tokens of the wiki-vital calib split, lr "
        f"{args.lr} (cosine), init {args.init} for widths and the layer influence for both blocks of a layer, gather execution. "
        f"Held-out: wiki-vital eval split, {args.windows_128} windows of 128 tokens and {args.windows_2048} of 2048 "
        f"(128: exp of the mean batch cross-entropy, batch 8; 2048: token-weighted, batch 4, as `pg-prune eval`). 'removed' columns: share of the prunable q/k/v/o/gate/up/down "
        f"parameters and of their forward FLOPs per token at 2048 tokens.",
        "",
        "| removed (target) | method | params removed | FLOPs removed | attn / MLP blocks removed | layers removed "
        "| PPL@128 | PPL@2048 | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sparsity']:.0%} | {r['method']} | {r['params_removed']:.1%} | {r['flops_removed']:.1%} | "
            f"{r.get('attn_blocks_removed', 0)} / {r.get('mlp_blocks_removed', 0)} | {r.get('layers_removed', 0)} | "
            f"{r['ppl@128']:.2f} | {r['ppl@2048']:.2f} | {r['seconds']:.0f} |"
        )
    notes = "\n" + args.notes.read_text() if args.notes is not None and args.notes.is_file() else ""
    args.out.write_text("\n".join(lines) + "\n" + notes)


if __name__ == "__main__":
    main()
