"""``pg-prune compare``: baselines and the policy-gradient search side by side (docs/results/quality.md).

For every ratio and method the units are selected on one model with the same calibration blocks,
removed with ``removal.prune_model`` from a copy of the dense model (FLAP: plus its bias
compensation), and the pruned copy is evaluated: held-out perplexity under both protocols
(non-overlapping 128-token windows, batch-mean; 2048-token windows, token-weighted; see
``evaluation.py``) and zero-shot accuracy through lm-eval. Wall time and peak memory cover the
selection only (scores + masks; for the search the initial metric and all steps).

Rows are saved to ``--results`` (JSON) after each one; ``--resume`` skips rows already there (the
settings must match), and the markdown report and plot are rendered from that file.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import logging
import math
import os
import platform
import re
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import torch

from ..core.checkpoint import write_atomic

NAME = "compare"
HELP = "compare baselines (random, magnitude, Wanda-sp, FLAP, Taylor) and the search; write quality.md"

logger = logging.getLogger(__name__)

SEARCH_METHODS = {"pg-wanda-sp": "wanda-sp", "pg-constant": "constant"}
# ratio-independent statistics that baselines.baseline_masks caches per run (time counted once)
STATISTICS_KEY = {"magnitude": "magnitude", "taylor": "taylor", "flap": "flap", "flap-joint": "flap"}
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..scoring.baselines import BASELINES
    from ..resources.text import DEFAULT_TEXT
    from ..resources.models import DEFAULT_MODEL

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
    p.add_argument("--results", type=Path, default=Path("docs/results/quality.json"), help="raw rows (JSON)")
    p.add_argument("--out", type=Path, default=Path("docs/results/quality.md"), help="markdown report")
    p.add_argument("--plot", type=Path, default=Path("docs/results/quality.png"), help="PNG plot")
    p.add_argument("--notes", type=Path, default=None,
                   help="markdown appended to the report under a 'not produced by this command' heading")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --results (same settings)")


# ----------------------------------------------------------------------------------------- measurement

def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _release_freed_memory() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measured(fn: Callable[[], object], device: torch.device) -> tuple[object, float, float]:
    """``(result, seconds, peak MiB above the start)`` of ``fn()``.

    GPU: ``torch.cuda.max_memory_allocated`` minus the memory allocated at the start. CPU: the
    process RSS sampled every 5 ms minus the RSS at the start (after returning freed heap memory to
    the OS with ``malloc_trim``).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize(device)
        return result, time.perf_counter() - start, (torch.cuda.max_memory_allocated(device) - base) / 2**20
    _release_freed_memory()
    base = _rss_mib()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], _rss_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        result = fn()
    finally:
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    return result, seconds, max(peak[0], _rss_mib()) - base


def _cpu_name() -> str:
    try:
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        names = []
    return names[0] if names else platform.machine()


def _machine(device: torch.device) -> dict:
    info = {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_start": os.getloadavg()[0],
            "versions": {name: version(name) for name in ("torch", "transformers", "torch-pruning", "lm_eval",
                                                          "pg-pruning-plugin")} | {"python": platform.python_version()}}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ----------------------------------------------------------------------------------------------- runs

def _settings(args: argparse.Namespace, tasks: tuple[str, ...]) -> dict:
    keys = ("model", "calib_text", "calib_blocks", "calib_seq_len", "seed", "steps", "samples", "lr", "batch_size",
            "init_mapping", "eval_text", "ppl128_windows", "ppl2048_windows", "limit", "dtype")
    return {k: getattr(args, k) for k in keys} | {"tasks": list(tasks)}


def _check(args: argparse.Namespace) -> tuple[str, ...]:
    """Validate everything cheap before loading; returns the zero-shot task names (empty: skipped)."""
    from ..evaluation.perplexity import KNOWN_TASKS, PAPER_TASKS, _offline_manifest, default_tasks_dir, hub_reachable

    if any(not 0 < r < 1 for r in args.ratios):
        raise ValueError(f"--ratios {args.ratios}: each must be in (0, 1)")
    for name in ("calib_blocks", "calib_seq_len", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if args.calib_blocks < args.batch_size:
        raise ValueError(f"--calib-blocks {args.calib_blocks} is fewer than one batch of {args.batch_size}")
    if args.notes is not None and not args.notes.is_file():
        raise FileNotFoundError(f"--notes {args.notes} does not exist")
    if args.limit < 0:
        raise ValueError("--limit must be >= 0 (0 skips zero-shot)")
    if args.limit == 0:
        return ()
    tasks = PAPER_TASKS if args.tasks == ["paper"] else tuple(args.tasks)
    unknown = [t for t in tasks if t not in KNOWN_TASKS]
    if unknown:
        raise ValueError(f"unknown zero-shot task(s) {unknown}; known: {', '.join(KNOWN_TASKS)} (or 'paper')")
    offline = {"auto": None, "yes": True, "no": False}[args.offline]
    if offline or (offline is None and not hub_reachable()):
        missing = [t for t in tasks if t not in _offline_manifest(default_tasks_dir())["tasks"]]
        if missing:
            raise FileNotFoundError(f"offline task(s) {missing} not built; run `pg-prune build-tasks`")
    return tasks


def _evaluate(net, tokenizer, blocks128, blocks2048, tasks, args) -> dict:
    from ..core.architectures import SearchSpace
    from ..evaluation.perplexity import perplexity_on_blocks, zero_shot
    from ..reporting import count_parameters

    space = SearchSpace.from_model(net)
    row = {"params": count_parameters(net), "prunable_params": space.prunable_parameters(),
           "kv_groups": sum(s.num_kv_groups for s in space.layers),
           "mlp_channels": sum(s.intermediate_size for s in space.layers)}
    row["ppl128"], _ = perplexity_on_blocks(net, blocks128, batch_size=8, reduction="batch", progress=False)
    if blocks2048 is not None:
        row["ppl2048"], _ = perplexity_on_blocks(net, blocks2048, batch_size=1, reduction="token", progress=False)
    if tasks:
        offline = {"auto": None, "yes": True, "no": False}[args.offline]
        zs = zero_shot(net, tokenizer, tasks=tasks, limit=args.limit, batch_size=16, offline=offline)
        row["zero_shot"] = {t: v.get("acc") for t, v in zs["tasks"].items()} | {"mean": zs["mean_acc"]}
    return row


def _select(method: str, ratio: float, model, blocks, batches, args, cache: dict):
    """``(masks, biases, info)`` of one method at one ratio."""
    from ..scoring.baselines import baseline_masks
    from ..search.loop import PolicyGradientSearch, SearchConfig

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
    from ..scoring.baselines import apply_biases
    from ..resources.text import calibration_blocks, source_blocks
    from ..resources.models import load_model
    from ..core.removal import prune_model

    tasks = _check(args)
    settings = _settings(args, tasks)
    state = {"settings": settings, "rows": []}
    if args.resume and args.results.is_file():
        state = json.loads(args.results.read_text())
        if state["settings"] != settings:
            raise ValueError(f"--resume: {args.results} was written with other settings {state['settings']}; "
                             f"drop --resume or pass another --results")
    done = {(r["method"], r["ratio"]) for r in state["rows"]}
    device = torch.device(args.device)
    machine = _machine(device)  # recorded with the first row this run produces
    command = shlex.join(["pg-prune", *sys.argv[1:]])

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    blocks = calibration_blocks(tokenizer, args.calib_text, args.calib_seq_len, args.calib_blocks, seed=args.seed)
    batches = list(blocks[: len(blocks) // args.batch_size * args.batch_size].split(args.batch_size))
    blocks128 = source_blocks(tokenizer, args.eval_text, "eval", 128, max_blocks=args.ppl128_windows)
    blocks2048 = (source_blocks(tokenizer, args.eval_text, "eval", 2048, max_blocks=args.ppl2048_windows)
                  if args.ppl2048_windows != 0 else None)
    state["eval"] = {"ppl128_windows": blocks128.shape[0], "ppl2048_windows": 0 if blocks2048 is None
                     else blocks2048.shape[0], "calib_tokens": len(batches) * args.batch_size * args.calib_seq_len}
    dense_space = SearchSpace.from_model(model)
    start, previous = time.perf_counter(), state.get("wall_seconds", 0.0)

    def save() -> None:  # the command is recorded once it has produced a row
        if not state.get("commands") or state["commands"][-1] != command:
            state["commands"] = [*state.get("commands", []), command]
        state["wall_seconds"] = previous + time.perf_counter() - start
        state["machine"] = machine | {"load_average_end": os.getloadavg()[0]}
        write_atomic(args.results, json.dumps(state, indent=1))
        render(state, args.out, args.plot, args.notes)

    if ("dense", 0.0) not in done:
        logger.info("evaluating the dense model")
        state["rows"].append({"method": "dense", "ratio": 0.0, "structure": "-"} |
                             _evaluate(model, tokenizer, blocks128, blocks2048, tasks, args))
        save()
    cache: dict = {}
    for ratio in args.ratios:
        for method in args.methods:
            if (method, ratio) in done:
                continue
            logger.info("%s at %.0f%%", method, 100 * ratio)
            (masks, biases, info), seconds, peak = measured(
                lambda: _select(method, ratio, model, blocks, batches, args, cache), device)
            net = prune_model(copy.deepcopy(model), masks)
            if biases is not None:
                apply_biases(net, biases)
            row = {"method": method, "ratio": ratio, "seconds": seconds, "peak_mib": peak} | info
            row |= _evaluate(net, tokenizer, blocks128, blocks2048, tasks, args)
            row["prunable_removed"] = 1 - row["prunable_params"] / dense_space.prunable_parameters()
            logger.info("%s", json.dumps(row))
            state["rows"].append(row)
            del net
            save()
    if state["rows"]:
        render(state, args.out, args.plot, args.notes)
    print(f"wrote {args.out}, {args.plot} and {args.results}")
    return 0


# ------------------------------------------------------------------------------------------- rendering

def _fmt(value, spec: str = ".2f") -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


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
        value = (lambda r: r.get("zero_shot", {}).get("mean")) if key == "zero_shot" else (lambda r: r.get(key))
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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


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
    s, m, ev, rows = state["settings"], state["machine"], state["eval"], [dict(r) for r in state["rows"]]
    _mark_reused(rows)
    v = m["versions"]
    order = {k: i for i, k in enumerate(LABELS)}
    rows = sorted(rows, key=lambda r: (r["ratio"], order.get(r["method"], 99)))
    dense = next((r for r in rows if r["method"] == "dense"), None)
    zs = bool(s["tasks"])
    lines = [
        "# Quality: baselines vs the policy-gradient search (`pg-prune compare`)", "",
        "Every number below was produced by " + " then ".join(f"`{c}`" for c in state["commands"])
        + (" (`--resume` keeps the earlier rows; the settings are checked to be identical)"
           if len(state["commands"]) > 1 else "") + "  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads"
        + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f"; 1-min load average {m['load_average_start']:.1f} at the start, "
          f"{m.get('load_average_end', float('nan')):.1f} at the end (shared machine: wall times include contention)  ",
        f"Versions: Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, torch-pruning "
        f"{v['torch-pruning']}, lm_eval {v['lm_eval']}, pg-pruning-plugin {v['pg-pruning-plugin']}; "
        f"dtype {s['dtype']}; total wall time {state.get('wall_seconds', 0) / 60:.0f} min", "",
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
        zero = f" {_fmt(r.get('zero_shot', {}).get('mean'), '.4f')} |" if zs else ""
        lines.append(
            f"| {r['ratio']:.0%} | {LABELS.get(r['method'], r['method'])} | {r.get('structure', '-')} | "
            f"{r['kv_groups']} | {r['mlp_channels']} | {_fmt(r.get('prunable_removed', 0.0), '.1%')} | "
            f"{_fmt(r.get('ppl128'))} | {_fmt(r.get('ppl2048'))} |{zero} "
            f"{_fmt(r.get('seconds'), '.0f')}{'*' if r['reused_statistics'] else ''} | "
            f"{_fmt(r.get('peak_mib'), '.0f')} |")
    if zs:
        lines += ["", "### Zero-shot accuracy per task", "",
                  "| removed | method | " + " | ".join(s["tasks"]) + " | mean |",
                  "|---:|---|" + "---:|" * (len(s["tasks"]) + 1)]
        for r in rows:
            z = r.get("zero_shot", {})
            lines.append(f"| {r['ratio']:.0%} | {LABELS.get(r['method'], r['method'])} | "
                         + " | ".join(_fmt(z.get(t), ".3f") for t in s["tasks"]) + f" | {_fmt(z.get('mean'), '.4f')} |")
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
