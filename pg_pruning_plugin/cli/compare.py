"""``pg-prune compare``: baselines and the policy-gradient search side by side.

For every ratio and method the units are selected on one model with the same calibration blocks,
removed with ``core.removal.prune_model`` from a copy of the dense model (FLAP: plus its bias
compensation), and the pruned copy is evaluated: held-out perplexity under both protocols
(non-overlapping 128-token windows, batch-mean; 2048-token windows, token-weighted; see
``evaluation/perplexity.py``) and zero-shot accuracy through lm-eval. Wall time and peak memory cover the
selection only (scores + masks; for the search the initial metric and all steps).

Rows are saved to the JSON file ``--results`` after each one (``evaluation/records.py``); ``--resume``
skips rows already there (the settings must match). ``bench/quality_report.py`` renders a markdown
report and a plot from that file (docs/results/quality.md).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import math
import shlex
import sys
from pathlib import Path

import torch

NAME = "compare"
HELP = "compare baselines (random, magnitude, Wanda-sp, FLAP, Taylor) and the search; rows to a JSON file"

logger = logging.getLogger(__name__)

SEARCH_METHODS = {"pg-wanda-sp": "wanda-sp", "pg-constant": "constant"}
# ratio-independent statistics that scoring.baselines.baseline_masks caches per run (time counted once)
STATISTICS_KEY = {"magnitude": "magnitude", "taylor": "taylor", "flap": "flap", "flap-joint": "flap"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..resources.models import DEFAULT_MODEL
    from ..resources.text import DEFAULT_TEXT
    from ..scoring.baselines import BASELINES

    methods = (*BASELINES, *SEARCH_METHODS)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model (default {DEFAULT_MODEL}, embedded)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5],
                   help="fractions of KV groups and of MLP channels removed")
    p.add_argument("--methods", nargs="+", choices=methods, default=list(methods), metavar="METHOD",
                   help=f"methods to run (default all: {' '.join(methods)})")
    c = p.add_argument_group("calibration (the same blocks for every data-driven method)")
    c.add_argument("--calib-text", default=DEFAULT_TEXT, help="calibration source (its calib split)")
    c.add_argument("--calib-blocks", type=int, default=128, help="number of calibration blocks")
    c.add_argument("--calib-seq-len", type=int, default=128, help="tokens per calibration block")
    c.add_argument("--seed", type=int, default=42,
                   help="seed of the calibration sample, the random baseline and the search")
    s = p.add_argument_group("policy-gradient search (cycles over the calibration blocks)")
    s.add_argument("--steps", type=int, default=2000, help="search steps (paper: 15000)")
    s.add_argument("--samples", type=int, default=2, help="mask samples per step, K")
    s.add_argument("--lr", type=float, default=2e-3)
    s.add_argument("--batch-size", type=int, default=8, help="blocks per step (and per metric batch)")
    s.add_argument("--init-mapping", default="sigmap", help="metric -> probability mapping of the Wanda-sp init")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-text", default=DEFAULT_TEXT, help="held-out source (its eval split)")
    e.add_argument("--ppl128-windows", type=int, default=None, help="first N 128-token windows (default: all)")
    e.add_argument("--ppl2048-windows", type=int, default=None, help="first N 2048-token windows (default: all)")
    e.add_argument("--tasks", nargs="+", default=["paper"],
                   help="zero-shot tasks ('paper' = boolq piqa hellaswag winogrande arc_easy arc_challenge "
                        "openbookqa)")
    e.add_argument("--limit", type=int, default=100, help="first N documents per task; 0 skips zero-shot")
    e.add_argument("--offline", choices=["auto", "yes", "no"], default="auto",
                   help="local lm-eval tasks from `pg-prune build-tasks` (auto: when the Hub is unreachable)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--results", type=Path, required=True, help="JSON file for the rows (written after every row)")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --results (same settings)")


# ----------------------------------------------------------------------------------------------- runs

def _settings(args: argparse.Namespace, tasks: tuple[str, ...]) -> dict:
    keys = ("model", "calib_text", "calib_blocks", "calib_seq_len", "seed", "steps", "samples", "lr", "batch_size",
            "init_mapping", "eval_text", "ppl128_windows", "ppl2048_windows", "limit", "dtype")
    return {k: getattr(args, k) for k in keys} | {"tasks": list(tasks)}


def _check(args: argparse.Namespace) -> tuple[str, ...]:
    """Validate everything cheap before loading; returns the zero-shot task names (empty: skipped)."""
    from ..evaluation.zero_shot import (
        KNOWN_TASKS,
        OFFLINE_CHOICES,
        PAPER_TASKS,
        default_tasks_dir,
        hub_reachable,
        offline_manifest,
    )

    if any(not 0 < r < 1 for r in args.ratios):
        raise ValueError(f"--ratios {args.ratios}: each must be in (0, 1)")
    for name in ("calib_blocks", "calib_seq_len", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if args.calib_blocks < args.batch_size:
        raise ValueError(f"--calib-blocks {args.calib_blocks} is fewer than one batch of {args.batch_size}")
    if args.limit < 0:
        raise ValueError("--limit must be >= 0 (0 skips zero-shot)")
    if args.limit == 0:
        return ()
    tasks = PAPER_TASKS if args.tasks == ["paper"] else tuple(args.tasks)
    unknown = [t for t in tasks if t not in KNOWN_TASKS]
    if unknown:
        raise ValueError(f"unknown zero-shot task(s) {unknown}; known: {', '.join(KNOWN_TASKS)} (or 'paper')")
    offline = OFFLINE_CHOICES[args.offline]
    if offline or (offline is None and not hub_reachable()):
        missing = [t for t in tasks if t not in offline_manifest(default_tasks_dir())["tasks"]]
        if missing:
            raise FileNotFoundError(f"offline task(s) {missing} not built; run `pg-prune build-tasks`")
    return tasks


def _evaluate(net, tokenizer, blocks128, blocks2048, tasks, args) -> dict:
    from ..core.architectures import SearchSpace, count_parameters
    from ..evaluation.perplexity import perplexity_on_blocks
    from ..evaluation.zero_shot import OFFLINE_CHOICES, zero_shot

    space = SearchSpace.from_model(net)
    row = {"params": count_parameters(net), "prunable_params": space.prunable_parameters(),
           "kv_groups": sum(s.num_kv_groups for s in space.layers),
           "mlp_channels": sum(s.intermediate_size for s in space.layers)}
    row["ppl128"], _ = perplexity_on_blocks(net, blocks128, batch_size=8, reduction="batch", progress=False)
    if blocks2048 is not None:
        row["ppl2048"], _ = perplexity_on_blocks(net, blocks2048, batch_size=1, reduction="token", progress=False)
    if tasks:
        zs = zero_shot(net, tokenizer, tasks=tasks, limit=args.limit, batch_size=16,
                       offline=OFFLINE_CHOICES[args.offline])
        row["zero_shot"] = {t: v.get("acc") for t, v in zs["tasks"].items()} | {"mean": zs["mean_acc"]}
    return row


def _select(method: str, ratio: float, model, blocks, batches, args, cache: dict):
    """``(masks, biases, info)`` of one method at one ratio."""
    from ..scoring.baselines import baseline_masks
    from ..search.config import SearchConfig
    from ..search.loop import PolicyGradientSearch

    if method in SEARCH_METHODS:
        per_epoch = len(batches)
        config = SearchConfig(sparsity=ratio, steps=args.steps, samples_per_step=args.samples, lr=args.lr,
                              batch_size=args.batch_size, max_epochs=math.ceil(args.steps / per_epoch),
                              init=SEARCH_METHODS[method], init_mapping=args.init_mapping, init_batches=per_epoch,
                              seed=args.seed)
        result = PolicyGradientSearch(model, blocks, config).run(progress=False)
        losses = result.history["loss"]
        info = {"structure": "global", "first_loss": sum(losses[:10]) / max(len(losses[:10]), 1),
                "last_loss": sum(losses[-10:]) / max(len(losses[-10:]), 1)}
        return result.masks, None, info
    reused = STATISTICS_KEY.get(method) in cache
    r = baseline_masks(model, method, ratio, batches=batches, seed=args.seed, cache=cache, progress=False)
    return r.masks, r.biases, {"structure": r.structure, "reused_statistics": reused}


def run(args: argparse.Namespace) -> int:
    from ..core.architectures import SearchSpace
    from ..core.removal import prune_model
    from ..evaluation.records import ResultFile
    from ..evaluation.speed import measured
    from ..resources.models import load_model
    from ..resources.text import calibration_blocks, source_blocks
    from ..scoring.baselines import apply_biases

    tasks = _check(args)
    device = torch.device(args.device)
    results = ResultFile(args.results, _settings(args, tasks), shlex.join(["pg-prune", *sys.argv[1:]]), device,
                         resume=args.resume)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    blocks = calibration_blocks(tokenizer, args.calib_text, args.calib_seq_len, args.calib_blocks, seed=args.seed)
    batches = list(blocks[: len(blocks) // args.batch_size * args.batch_size].split(args.batch_size))
    blocks128 = source_blocks(tokenizer, args.eval_text, "eval", 128, max_blocks=args.ppl128_windows)
    blocks2048 = (source_blocks(tokenizer, args.eval_text, "eval", 2048, max_blocks=args.ppl2048_windows)
                  if args.ppl2048_windows != 0 else None)
    results.data["eval"] = {"ppl128_windows": blocks128.shape[0], "ppl2048_windows": 0 if blocks2048 is None
                            else blocks2048.shape[0],
                            "calib_tokens": len(batches) * args.batch_size * args.calib_seq_len}
    dense_space = SearchSpace.from_model(model)

    if not results.has(method="dense", ratio=0.0):
        logger.info("evaluating the dense model")
        results.add({"method": "dense", "ratio": 0.0, "structure": "-"} |
                    _evaluate(model, tokenizer, blocks128, blocks2048, tasks, args))
    cache: dict = {}
    for ratio in args.ratios:
        for method in args.methods:
            if results.has(method=method, ratio=ratio):
                continue
            logger.info("%s at %.0f%%", method, 100 * ratio)
            (masks, biases, info), seconds, peak = measured(
                functools.partial(_select, method, ratio, model, blocks, batches, args, cache), device)
            net = prune_model(copy.deepcopy(model), masks)
            if biases is not None:
                apply_biases(net, biases)
            row = {"method": method, "ratio": ratio, "seconds": seconds, "peak_mib": peak} | info
            row |= _evaluate(net, tokenizer, blocks128, blocks2048, tasks, args)
            row["prunable_removed"] = 1 - row["prunable_params"] / dense_space.prunable_parameters()
            logger.info("%s", json.dumps(row))
            results.add(row)
            del net
    print(f"wrote {args.results} (render a report with bench/quality_report.py)")
    return 0
