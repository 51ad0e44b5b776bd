"""``pg-prune compare``: every method × every refit option at one budget, the fraction of prunable parameters removed.

For every ratio in ``--ratios`` (the fraction of the prunable q/k/v/o/gate/up/down weights removed) each
method selects its units on the dense model from the same calibration blocks (``--calib-blocks`` of
``--calib-seq-len`` tokens of ``--calib-text``'s calib split, sampled with ``--seed``): the
parameter-matched baselines of ``scoring/baselines.py`` and the policy-gradient search under each
configuration named in ``--search-configs`` (a ``SearchConfig`` preset: :func:`search_config`). Then,
for every option of ``--refit``, a copy of the dense model is refit for those masks on the same
calibration blocks (``pg_pruning_plugin.refit.refit``), pruned with ``core.removal.prune_model`` and
evaluated: held-out perplexity under both protocols (non-overlapping 128-token windows, batch-mean;
2048-token windows, token-weighted; ``evaluation/perplexity.py``). One row per method × ratio × refit
records the achieved prunable fraction and widths, the selection's wall time and peak memory (scores
and masks; for the search its initial metric and all steps), and the refit's wall time, peak memory
and mean reconstruction errors.

Zero-shot accuracy (lm-eval, the first ``--limit`` documents per task, with each task's standard
error and the mean's) is measured after every perplexity row, only for the rows ``--zero-shot-rows``
names (:func:`zero_shot_targets`): the dense model, per ratio of ``--ratios`` the best baseline row by
PPL@128 (best over methods and refits), and each search configuration with its best refit.

Rows are saved to the JSON file ``--results`` after each one (``evaluation/records.py``), the masks of
every selection beside it (``<results>.masks.pt``); ``--resume`` skips the rows already there and reuses
the saved masks (the settings must match, except the zero-shot ``--limit`` and ``--tasks``: a resumed
run with others re-measures the zero-shot of its target rows). ``bench/quality_report.py`` renders a
markdown report and a plot from the JSON file (docs/results/quality.md).

Under ``torchrun`` every rank runs every selection and refit (their statistics and the search are
split over the ranks, docs/distributed.md); rank 0 alone evaluates, and writes the rows and masks,
and hands its measurements to the other ranks so that all of them keep the same rows.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import logging
import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..search.config import SearchConfig

NAME = "compare"
HELP = ("compare every baseline and the search, each with every weight refit, at one prunable-parameter budget; "
        "rows to a JSON file")

logger = logging.getLogger(__name__)

SEARCH_PREFIX = "pg-"  # a search row's method is SEARCH_PREFIX + the name of its configuration
ZERO_SHOT_ROLES = ("dense", "best-baseline", "search")
ZERO_SHOT_SETTINGS = ("limit", "tasks")  # settings a resumed run may change: they apply to the zero-shot rows only


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..refit import REFIT_METHODS
    from ..resources.models import DEFAULT_MODEL
    from ..resources.text import DEFAULT_TEXT
    from ..scoring.baselines import BASELINES, PARAM_MATCHED

    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model (default {DEFAULT_MODEL}, embedded)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3, 0.5],
                   help="fractions of the prunable (q/k/v/o/gate/up/down) parameters removed")
    p.add_argument("--methods", nargs="+", choices=(*BASELINES, "search"), default=[*PARAM_MATCHED, "search"],
                   metavar="METHOD",
                   help="baselines to run, and 'search' for the search rows (wanda-sp-units, the authors' per-layer "
                        "unit-count mask, is not parameter-matched and not in the default)")
    configs = search_configs()
    p.add_argument("--search-configs", nargs="+", choices=configs, default=list(configs), metavar="NAME",
                   help="search configurations (SearchConfig presets, the default one first), one row each")
    p.add_argument("--refit", nargs="+", choices=REFIT_METHODS, default=list(REFIT_METHODS),
                   help="weight refit options, each applied to every method's masks")
    p.add_argument("--damping", type=float, default=0.01, help="lstsq refit damping (fraction of the mean diagonal)")
    c = p.add_argument_group("calibration (the same blocks for every method, the search and the refit)")
    c.add_argument("--calib-text", default=DEFAULT_TEXT, help="calibration source (its calib split)")
    c.add_argument("--calib-blocks", type=int, default=128, help="number of calibration blocks")
    c.add_argument("--calib-seq-len", type=int, default=128, help="tokens per calibration block")
    c.add_argument("--batch-size", type=int, default=8, help="blocks per batch (metrics, search steps, refit)")
    c.add_argument("--seed", type=int, default=42,
                   help="seed of the calibration sample, the random baseline and the search")
    s = p.add_argument_group("policy-gradient search (cycles over the calibration blocks)")
    s.add_argument("--steps", nargs="+", type=_steps, default=[], metavar="[NAME=]STEPS",
                   help="search steps: STEPS for every configuration, NAME=STEPS for one (default: each "
                        "configuration's own, e.g. --steps authors=500)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-text", default=DEFAULT_TEXT, help="held-out source (its eval split)")
    e.add_argument("--ppl128-windows", type=int, default=None, help="first N 128-token windows (default: all)")
    e.add_argument("--ppl2048-windows", type=int, default=None,
                   help="first N 2048-token windows (default: all; 0 skips PPL@2048)")
    e.add_argument("--zero-shot-rows", nargs="+", choices=ZERO_SHOT_ROLES, default=list(ZERO_SHOT_ROLES),
                   help="rows that get zero-shot: dense, the best baseline per ratio of --ratios (by PPL@128, "
                        "best refit), each search configuration with its best refit")
    e.add_argument("--tasks", nargs="+", default=["paper"],
                   help="zero-shot tasks ('paper' = boolq piqa hellaswag winogrande arc_easy arc_challenge "
                        "openbookqa)")
    e.add_argument("--limit", type=int, default=200,
                   help="first N documents per task (200 or more for a ranking; 0 skips zero-shot)")
    e.add_argument("--offline", choices=["auto", "yes", "no"], default="auto",
                   help="local lm-eval tasks from `pg-prune build-tasks` (auto: when the Hub is unreachable)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--results", type=Path, required=True, help="JSON file for the rows (written after every row)")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --results (same settings)")


# ------------------------------------------------------------------------------------------ the search

def _steps(text: str) -> tuple[str, int]:
    """A ``--steps`` entry: ``"500"`` -> ``("*", 500)`` (every configuration), ``"authors=500"`` -> ``("authors",
    500)``."""
    name, _, value = text.rpartition("=")
    try:
        steps = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give STEPS or NAME=STEPS with an integer STEPS") from None
    if steps < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the number of steps must be positive")
    return name or "*", steps


def steps_of(entries: Sequence[tuple[str, int]], name: str) -> int | None:
    """The steps ``--steps`` gives configuration ``name`` (its own entry, else the bare one), or None."""
    given = dict(entries)
    return given.get(name, given.get("*"))


def search_configs() -> tuple[str, ...]:
    """Names of the search configurations a compare can run: the presets of ``SearchConfig``, its default first."""
    from ..search.config import PRESETS, SearchConfig

    default = SearchConfig().preset
    return (default, *(name for name in PRESETS if name != default))


def search_config(name: str, ratio: float, num_batches: int, batch_size: int, seed: int,
                  steps: int | None = None) -> SearchConfig:
    """The :class:`~pg_pruning_plugin.search.config.SearchConfig` of the search configuration ``name``
    (one of :func:`search_configs`) at ``ratio``, on ``num_batches`` calibration batches of ``batch_size``
    blocks: the preset's own settings, with what every method of the compare shares (the sparsity, the
    seed, the calibration batches, all of which the initial metric reads) and, when given, ``steps``. A
    preset that limits the passes over the calibration gets as many as its steps need."""
    from ..search.config import SearchConfig

    preset = SearchConfig(preset=name)
    steps = steps or preset.steps
    epochs = preset.max_epochs and max(preset.max_epochs, math.ceil(steps / num_batches))
    return SearchConfig(preset=name, sparsity=ratio, steps=steps, batch_size=batch_size, seed=seed,
                        max_epochs=epochs, init_batches=num_batches)


def is_search(method: str) -> bool:
    """Whether a row's ``method`` is a search configuration's (``pg-<name>``)."""
    return method.startswith(SEARCH_PREFIX)


# ------------------------------------------------------------------------------------- zero-shot rows

def zero_shot_targets(rows: Sequence[dict], roles: Sequence[str],
                      ratios: Sequence[float] | None = None) -> list[tuple[str, dict]]:
    """``(role, row)`` of the rows that get zero-shot under ``roles`` (:data:`ZERO_SHOT_ROLES`): the dense
    row; per ratio (of ``ratios``; default every ratio of ``rows``) the baseline row with the lowest PPL@128
    over every method and refit; per ratio and search configuration its row with the lowest PPL@128 over
    the refit options."""
    out = []
    if "dense" in roles:
        out += [("dense", r) for r in rows if r["method"] == "dense"]
    present = {r["ratio"] for r in rows if r["method"] != "dense"}
    for ratio in sorted(present if ratios is None else present & set(ratios)):
        at = [r for r in rows if r["ratio"] == ratio and r["method"] != "dense" and r.get("ppl128") is not None]
        baselines = [r for r in at if not is_search(r["method"])]
        if "best-baseline" in roles and baselines:
            out.append(("best-baseline", min(baselines, key=lambda r: r["ppl128"])))
        if "search" in roles:
            for method in dict.fromkeys(r["method"] for r in at if is_search(r["method"])):
                out.append(("search", min((r for r in at if r["method"] == method), key=lambda r: r["ppl128"])))
    return out


def zero_shot_summary(result: dict, limit: int) -> dict:
    """Per task accuracy and lm-eval's standard error, and their mean with the mean's standard error
    ``sqrt(Σ se_t²) / T`` (the tasks' documents are independent)."""
    tasks = {t: {"acc": v.get("acc"), "acc_stderr": v.get("acc_stderr"), "n": v.get("n")}
             for t, v in result["tasks"].items()}
    errors = [v["acc_stderr"] for v in tasks.values()]
    mean_stderr = (math.sqrt(sum(e * e for e in errors)) / len(errors)
                   if errors and all(e is not None for e in errors) else None)
    return {"tasks": tasks, "mean": result["mean_acc"], "mean_stderr": mean_stderr, "limit": limit}


# ----------------------------------------------------------------------------------------------- runs

def _settings(args: argparse.Namespace, tasks: tuple[str, ...]) -> dict:
    keys = ("model", "calib_text", "calib_blocks", "calib_seq_len", "batch_size", "seed", "damping",
            "eval_text", "ppl128_windows", "ppl2048_windows", "limit", "dtype")
    return {k: getattr(args, k) for k in keys} | {"tasks": list(tasks), "steps": dict(args.steps)}


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
    for name in ("calib_blocks", "calib_seq_len", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    unknown = [name for name, _ in args.steps if name not in ("*", *search_configs())]
    if unknown:
        raise ValueError(f"--steps names unknown search configuration(s) {unknown}; known: "
                         f"{', '.join(search_configs())}")
    if args.calib_blocks < args.batch_size:
        raise ValueError(f"--calib-blocks {args.calib_blocks} is fewer than one batch of {args.batch_size}")
    if not (math.isfinite(args.damping) and args.damping > 0):
        raise ValueError(f"--damping {args.damping}: a positive fraction of the mean diagonal (e.g. 0.01)")
    if "search" in args.methods:
        for name in args.search_configs:  # the configuration itself must be valid
            search_config(name, args.ratios[0], args.calib_blocks // args.batch_size, args.batch_size, args.seed,
                          steps_of(args.steps, name))
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


class _Selections:
    """The masks and selection records of every (method, ratio), in one torch file beside the results (written
    only while ``write`` is on)."""

    def __init__(self, path: Path, resume: bool):
        self.path, self.write = path, True
        self.entries: dict[str, dict] = torch.load(path, weights_only=True) if resume and path.is_file() else {}

    @staticmethod
    def key(method: str, ratio: float) -> str:
        return f"{method}@{ratio}"

    def get(self, method: str, ratio: float):
        """``(masks, info)`` or None."""
        from ..core.units import UnitValues

        entry = self.entries.get(self.key(method, ratio))
        if entry is None:
            return None
        return UnitValues(**{k: v.float() for k, v in entry["masks"].items()}), json.loads(entry["info"])

    def put(self, method: str, ratio: float, masks, info: dict) -> None:
        from ..resources.files import atomic_file

        self.entries[self.key(method, ratio)] = {"masks": {k: v.to(torch.uint8) for k, v in masks.as_dict().items()},
                                                 "info": json.dumps(info)}
        if not self.write:
            return
        with atomic_file(self.path) as tmp:
            torch.save(self.entries, tmp)


def _perplexities(net, blocks128, blocks2048) -> dict:
    from ..core.architectures import SearchSpace, count_parameters
    from ..evaluation.perplexity import perplexity_on_blocks

    space = SearchSpace.from_model(net)
    row = {"params": count_parameters(net), "prunable_params": space.prunable_parameters(),
           "kv_groups": sum(s.num_kv_groups for s in space.layers),
           "mlp_channels": sum(s.intermediate_size for s in space.layers), "layers": space.num_layers}
    row["ppl128"], _ = perplexity_on_blocks(net, blocks128, batch_size=8, reduction="batch", progress=False)
    if blocks2048 is not None:
        row["ppl2048"], _ = perplexity_on_blocks(net, blocks2048, batch_size=1, reduction="token", progress=False)
    return row


def _select(method: str, ratio: float, model, blocks, batches, args, cache: dict):
    """``(masks, info)`` of one method at one ratio."""
    import dataclasses

    from ..scoring.baselines import baseline_masks
    from ..search.loop import PolicyGradientSearch

    if is_search(method):
        name = method.removeprefix(SEARCH_PREFIX)
        config = search_config(name, ratio, len(batches), args.batch_size, args.seed, steps_of(args.steps, name))
        result = PolicyGradientSearch(model, blocks, config).run(progress=False)
        losses = result.history["loss"]
        info = {"structure": "search", "search_config": dataclasses.asdict(config),
                "first_loss": sum(losses[:10]) / max(len(losses[:10]), 1),
                "last_loss": sum(losses[-10:]) / max(len(losses[-10:]), 1)}
        return result.masks, info
    r = baseline_masks(model, method, ratio, batches=batches, seed=args.seed, cache=cache, progress=False)
    return r.masks, {"structure": r.structure, "reused_statistics": r.reused_statistics}


def _refit_and_prune(model, masks, option: str, batches, args, device):
    """A pruned copy of ``model``, refit with ``option`` first; and the refit's record."""
    from ..core.removal import prune_model
    from ..evaluation.speed import measured
    from ..refit import refit

    net = copy.deepcopy(model)
    report, seconds, peak = measured(functools.partial(refit, net, masks, batches, method=option,
                                                       damping=args.damping, progress=False), device)
    record = {"refit_seconds": seconds, "refit_peak_mib": peak, "refit_statistics_mib": report.peak_statistics_mib,
              "refit_tokens": report.tokens, "refit_errors": report.mean_errors()}
    return prune_model(net, masks), record


def run(args: argparse.Namespace) -> int:
    from ..core import distributed
    from ..core.architectures import SearchSpace
    from ..evaluation.records import ResultFile
    from ..evaluation.speed import measured
    from ..evaluation.zero_shot import OFFLINE_CHOICES, zero_shot
    from ..resources.models import load_model
    from ..resources.text import calibration_blocks, source_blocks

    tasks = _check(args)
    device = torch.device(args.device)
    if distributed.is_distributed() and device.type == "cuda":
        device = distributed.local_device()  # one GPU per rank
    # rank 0 reads, writes and measures; the other ranks get its rows, so all of them take the same turns
    measure, main = distributed.from_main, distributed.is_main()
    results = measure(lambda: ResultFile(args.results, _settings(args, tasks), shlex.join(["pg-prune", *sys.argv[1:]]),
                                         device, resume=args.resume, free=ZERO_SHOT_SETTINGS), "results file")
    selections = measure(lambda: _Selections(args.results.with_suffix(".masks.pt"), args.resume), "saved masks")
    results.write = selections.write = main
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device)
    blocks = calibration_blocks(tokenizer, args.calib_text, args.calib_seq_len, args.calib_blocks, seed=args.seed)
    batches = list(blocks[: len(blocks) // args.batch_size * args.batch_size].split(args.batch_size))
    blocks128 = source_blocks(tokenizer, args.eval_text, "eval", 128, max_blocks=args.ppl128_windows)
    blocks2048 = (source_blocks(tokenizer, args.eval_text, "eval", 2048, max_blocks=args.ppl2048_windows)
                  if args.ppl2048_windows != 0 else None)
    results.data["eval"] = {"ppl128_windows": blocks128.shape[0], "ppl2048_windows": 0 if blocks2048 is None
                            else blocks2048.shape[0],
                            "calib_tokens": len(batches) * args.batch_size * args.calib_seq_len}
    dense_prunable = SearchSpace.from_model(model).prunable_parameters()
    # The libraries, the model and the data live for the whole run: moved out of the collector's reach, they
    # are not traversed again by the garbage collection before every memory measurement.
    gc.freeze()
    methods = [m for m in args.methods if m != "search"]
    if "search" in args.methods:
        methods += [SEARCH_PREFIX + name for name in args.search_configs]

    if not results.has(method="dense"):
        logger.info("evaluating the dense model")
        results.add({"method": "dense", "ratio": 0.0, "refit": "none", "structure": "-", "prunable_removed": 0.0}
                    | measure(functools.partial(_perplexities, model, blocks128, blocks2048), "dense perplexities"))
    cache: dict = {}

    def selection(method: str, ratio: float):
        """``(masks, info)`` of ``method`` at ``ratio``: saved by an earlier row, or selected now (and saved)."""
        saved = selections.get(method, ratio)
        if saved is not None:
            return saved
        logger.info("%s at %.0f%%: selecting", method, 100 * ratio)
        (masks, info), seconds, peak = measured(
            functools.partial(_select, method, ratio, model, blocks, batches, args, cache), device)
        info |= {"selection_seconds": seconds, "selection_peak_mib": peak}
        selections.put(method, ratio, masks, info)
        return masks, info

    for ratio in args.ratios:
        for method in methods:
            todo = [o for o in args.refit if not results.has(method=method, ratio=ratio, refit=o)]
            if not todo:
                continue
            masks, info = selection(method, ratio)
            for option in todo:
                logger.info("%s at %.0f%%, refit %s", method, 100 * ratio, option)
                net, record = _refit_and_prune(model, masks, option, batches, args, device)
                row = {"method": method, "ratio": ratio, "refit": option} | info | record
                row |= measure(functools.partial(_perplexities, net, blocks128, blocks2048), "perplexities")
                row["prunable_removed"] = 1 - row["prunable_params"] / dense_prunable
                logger.info("%s", json.dumps(row))
                results.add(row)
                del net

    for role, row in zero_shot_targets(results.rows, args.zero_shot_rows, args.ratios) if tasks else ():
        done = row.get("zero_shot")
        if done and done["limit"] == args.limit and set(done["tasks"]) == set(tasks):
            continue
        logger.info("zero-shot: %s (%s at %.0f%%, refit %s)", role, row["method"], 100 * row["ratio"], row["refit"])
        net = model
        if row["method"] != "dense":
            net, _ = _refit_and_prune(model, selection(row["method"], row["ratio"])[0], row["refit"], batches, args,
                                      device)
        result = measure(functools.partial(zero_shot, net, tokenizer, tasks=tasks, limit=args.limit, batch_size=16,
                                           offline=OFFLINE_CHOICES[args.offline]), "zero-shot accuracy")
        row["zero_shot"] = zero_shot_summary(result, args.limit)
        results.save()
        del net
    if main:
        print(f"wrote {args.results} (render a report with bench/quality_report.py)")
    return 0
