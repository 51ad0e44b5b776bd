"""``pg-prune prune``: search, refit, prune, evaluate and save, with a short report at the end.

With no arguments it runs the embedded default: SmolLM2-135M-Instruct, 30 % of the prunable
parameters removed by the allocation search (``--preset allocation``), the surviving weights refitted
by least squares (``--refit lstsq``), calibrated on 128 blocks of the wiki-vital calib split and
evaluated on the held-out eval split, next to the best metric baseline at the same budget with the
same refit (``--baseline``, ``--baseline none`` skips it). ``--preset authors`` runs the paper's
per-unit search instead.

Under ``torchrun`` every rank loads the model on its device and runs the search (docs/distributed.md);
rank 0 alone reads the search state, evaluates, saves and prints, and the others wait for it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import time
from pathlib import Path

import torch
from transformers import AutoConfig

from ..core import distributed
from ..core.architectures import SearchSpace, architecture_of, count_parameters, projections
from ..core.checkpoint import save_pruned
from ..core.masking import masked
from ..core.removal import kept_space, prune_model
from ..evaluation.perplexity import perplexity
from ..refit import REFIT_METHODS, refit
from ..reporting import REPORT_FILE, format_accounting, layer_table, plot_curves, plot_layer_widths, pruning_report
from ..resources.models import DEFAULT_MODEL, load_model, model_paths, resolve_model_dir, weightless_model
from ..resources.outputs import check_output
from ..resources.text import DEFAULT_TEXT, calibration_blocks, check_text_source
from ..scoring.baselines import BASELINES, baseline_masks
from ..scoring.metrics import METRICS
from ..search.budget import GRANULARITIES, Budget
from ..search.config import EXECUTIONS, PRESETS, ResumeError, SearchConfig
from ..search.init import INIT_MAPPINGS
from ..search.loop import PolicyGradientSearch
from ..search.objective import LOSSES
from ..search.policy import ESTIMATORS
from ..search.state_file import SavedState, check_signature, read_state, signature

NAME = "prune"
HELP = ("learn which KV groups, MLP channels (and whole blocks) to remove with the policy-gradient search, then "
        "remove them")

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"HF directory, .gguf file or Hub id ({DEFAULT_MODEL}: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--text", default=DEFAULT_TEXT,
                   help="calibration text: wiki-vital (embedded), wikitext2, c4, or a .txt/.jsonl file")
    p.add_argument("--eval-text", default=None,
                   help="held-out text for the report (None: the eval split of --text; required for files)")
    p.add_argument("--output", default="runs/smollm2-pg30", help="directory for the pruned model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    g = p.add_argument_group("budget")
    g.add_argument("--sparsity", type=float, default=0.3,
                   help="fraction removed: of the prunable parameters (allocation preset, or with --cost), or of "
                        "the units of each type (--preset authors)")
    g.add_argument("--attn-sparsity", type=float, default=None, help="fraction of KV groups removed (units policy)")
    g.add_argument("--mlp-sparsity", type=float, default=None, help="fraction of MLP channels removed (units policy)")
    g.add_argument("--uniform", action="store_true",
                   help="same keep rate in every layer (stock HF checkpoint; units policy)")
    g.add_argument("--round-to", type=int, default=None, help="kept MLP widths rounded to a multiple of N")
    g.add_argument("--granularity", choices=GRANULARITIES, default="width",
                   help="units: width (KV groups, MLP channels), depth (whole attention/MLP blocks), or both")
    g.add_argument("--cost", choices=("params", "flops"), default=None,
                   help="one budget in this currency instead of separate per-type budgets: --sparsity is then the "
                        "fraction of prunable parameters (or FLOPs/token) removed (depth granularities: params)")
    g.add_argument("--cost-seq-len", type=int, default=2048, help="context length of the FLOPs cost and report")
    g.add_argument("--keep-params", type=_count, default=None,
                   help="total parameters to keep, e.g. 100M or 1.2e8 (one parameter budget instead of --sparsity)")
    s = p.add_argument_group("search (None: the preset's value, search/config.py PRESETS; docs/method.md)")
    s.add_argument("--preset", choices=PRESETS, default="allocation",
                   help="allocation: per-layer widths by policy gradient over level transfers, candidates scored "
                        "refitted (ours); authors: the paper's per-unit Bernoulli search")
    s.add_argument("--steps", type=int, default=None, help="optimisation steps (allocation: 100; authors: 15000)")
    s.add_argument("--samples", type=int, default=None, help="candidates per step, K (allocation: 4; authors: 2)")
    s.add_argument("--lr", type=float, default=None,
                   help="step size: of the transfer policy's logits (allocation: 20) or of the unit scores, cosine "
                        "to 0 (authors: 2e-3)")
    s.add_argument("--loss", choices=LOSSES, default=None, help="candidate score (allocation: kl; authors: ce)")
    s.add_argument("--incumbent-every", type=int, default=None,
                   help="steps between held-in checks of the deployed mask (allocation: 5; authors: 0 = none)")
    s.add_argument("--baseline-window", type=int, default=5, help="EMA baseline window W (units policy)")
    s.add_argument("--batch-size", type=int, default=8, help="calibration blocks per step")
    s.add_argument("--seq-len", type=int, default=128, help="tokens per calibration block")
    s.add_argument("--calib-blocks", type=int, default=None,
                   help="calibration blocks for the search and the refit (None: 128 when the search may cycle over "
                        "them, else steps / max-epochs batches)")
    s.add_argument("--max-epochs", type=int, default=None,
                   help="passes allowed over the calibration blocks (0: no limit; allocation: 0; authors: 1)")
    s.add_argument("--init", choices=METRICS, default="wanda-sp", help="initial metric (units policy)")
    s.add_argument("--init-mapping", choices=INIT_MAPPINGS, default="sigmap",
                   help="metric to initial keep-probabilities (units policy; mask: the init mask itself)")
    s.add_argument("--init-batches", type=int, default=4, help="calibration batches for the initial metric")
    s.add_argument("--estimator", choices=ESTIMATORS, default="authors", help="gradient estimator (units policy)")
    s.add_argument("--execution", choices=EXECUTIONS, default=None,
                   help="gather: skip the compute of dropped units (faster, same losses); mask: multiply by 0")
    s.add_argument("--seed", type=int, default=42, help="calibration sample, mask sampling and batch order")
    s.add_argument("--checkpoint", default=None,
                   help="search-state file, written every --checkpoint-every steps (None: OUTPUT.search-state.pt)")
    s.add_argument("--checkpoint-every", type=int, default=25, help="steps between search-state snapshots")
    s.add_argument("--resume", action="store_true", help="continue from an existing --checkpoint file")
    r = p.add_argument_group("refit (docs/refit.md)")
    r.add_argument("--refit", choices=REFIT_METHODS, default="lstsq",
                   help="repair of the surviving weights before removal: least squares, FLAP's bias, or none")
    r.add_argument("--refit-damping", type=float, default=0.01,
                   help="λ of the least squares, a fraction of the mean diagonal of H")
    e = p.add_argument_group("report")
    e.add_argument("--eval-windows", type=int, default=64,
                   help="held-out 128-token windows for the dense/pruned perplexity (0: skip)")
    e.add_argument("--baseline", choices=("none", *BASELINES), default=None,
                   help="metric baseline pruned at the same budget with the same refit and evaluated on the same "
                        "windows, for the report (none: skip; None: wanda-sp with a prunable-parameter budget, "
                        "else none)")


def _count(text: str) -> int:
    """``100M``, ``4.5B``, ``1.2e8`` -> an integer count."""
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}.get(text[-1:].upper(), 1)
    try:
        value = float(text[:-1] if scale != 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count such as 100M, 4.5B or 1.2e8") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("--keep-params must be positive")
    return int(value)


def _config(args: argparse.Namespace) -> SearchConfig:
    return SearchConfig(
        preset=args.preset, sparsity=args.sparsity, attn_sparsity=args.attn_sparsity, mlp_sparsity=args.mlp_sparsity,
        global_budget=not args.uniform, steps=args.steps, samples_per_step=args.samples, lr=args.lr,
        loss=args.loss, incumbent_every=args.incumbent_every, refit_damping=args.refit_damping,
        baseline_window=args.baseline_window, batch_size=args.batch_size, max_epochs=args.max_epochs,
        init=args.init, init_mapping=args.init_mapping, init_batches=args.init_batches,
        estimator=args.estimator, execution=args.execution, round_to=args.round_to, seed=args.seed,
        checkpoint_every=args.checkpoint_every, granularity=args.granularity, cost=args.cost,
        cost_seq_len=args.cost_seq_len, keep_params=args.keep_params,
    )


def _calibration_size(args: argparse.Namespace, config: SearchConfig) -> int:
    """Calibration blocks: ``--calib-blocks``, else 128 for a search that cycles over them (the refit and the
    metric baselines use the same), else what ``steps`` batches over ``max_epochs`` passes need."""
    if args.calib_blocks:
        return args.calib_blocks
    if not config.max_epochs:
        return 128
    return math.ceil(config.steps / config.max_epochs) * config.batch_size


def _state_path(args: argparse.Namespace) -> Path:
    return Path(args.checkpoint or f"{Path(args.output).expanduser().resolve()}.search-state.pt")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    # Everything the user can get wrong is checked before the model loads.
    config = _config(args)  # ratios and search settings
    output = check_output(args.output, args.overwrite, model_paths(args.model), overwrite_hint="--overwrite")
    state_path = _state_path(args)
    saved = distributed.from_main(lambda: _saved_state(args, state_path), "check of the search state")
    for source in filter(None, (args.text, args.eval_text)):
        check_text_source(source)
    if Path(args.text).suffix in (".txt", ".jsonl") and args.eval_windows and not args.eval_text:
        raise ValueError("a local calibration file has no held-out split: pass --eval-text FILE or --eval-windows 0")
    model_dir = resolve_model_dir(args.model)
    architecture_of(AutoConfig.from_pretrained(model_dir))  # unsupported models fail before weights load
    before_space = SearchSpace.from_model(weightless_model(model_dir))
    budget = Budget.of(before_space, config)  # resolves --keep-params; refuses an unreachable budget
    num_blocks = _calibration_size(args, config)
    if saved is not None:  # ResumeError naming the field that differs from this run
        check_signature(saved, signature(config, before_space, num_blocks // config.batch_size), state_path)
    params_budget = budget.requested()["cost"] == "params"
    if args.baseline is None:
        args.baseline = "wanda-sp" if params_budget else "none"
    elif args.baseline != "none" and not params_budget:
        kind = budget.requested()["cost"] or "per unit type"
        raise ValueError(f"--baseline {args.baseline} compares at one prunable-parameter budget (the allocation "
                         f"preset, or --cost params); this run's budget is {kind}: drop --baseline")

    model, tokenizer = load_model(model_dir, device=distributed.local_device())
    calib = calibration_blocks(tokenizer, args.text, args.seq_len, num_blocks, seed=args.seed)
    eval_text = args.eval_text or args.text

    def held_out_ppl():
        if not args.eval_windows or not distributed.is_main():
            return None
        return perplexity(model, tokenizer, eval_text, seq_len=128, max_windows=args.eval_windows)

    params_before = count_parameters(model)
    if args.keep_params:
        logger.info("--keep-params %s: removing %.2f%% of the prunable parameters", f"{args.keep_params:,}",
                    100 * budget.requested()["cost_sparsity"])
    dense_ppl = held_out_ppl()

    search = PolicyGradientSearch(model, calib, config, checkpoint_path=state_path)
    result = search.run()
    baseline = None
    if args.baseline != "none" and args.eval_windows:  # every rank: its statistics and refit are collective
        baseline = _baseline_ppl(model, calib, args, budget.requested()["cost_sparsity"], held_out_ppl)
    refit_report = refit(model, result.masks, calib, args.refit, damping=args.refit_damping,
                         batch_size=config.batch_size)
    prune_model(model, result.masks)
    if not distributed.is_main():
        distributed.barrier("the end of rank 0's evaluation and saving")
        return 0
    after_space = kept_space(before_space, result.masks)
    params_after = count_parameters(model)
    pruned_ppl = held_out_ppl()
    evaluation = None if not dense_ppl else {"dense_ppl": dense_ppl.ppl, "pruned_ppl": pruned_ppl.ppl,
                                             "protocol": str(pruned_ppl)}
    if evaluation and baseline:
        evaluation["baseline"] = baseline
    run = {"model": args.model, "calibration": args.text, "arguments": vars(args)}
    report = pruning_report(before_space, result.masks, search.budget, result, params=(params_before, params_after),
                            evaluation=evaluation, run=run, distributed=search.split.as_dict(),
                            refit=refit_report.as_dict())
    written = save_pruned(model, output, tokenizer, overwrite=args.overwrite,
                          extra_files={REPORT_FILE: json.dumps(report, indent=2)})
    result.save(written / "search_result.pt")
    plot_layer_widths(before_space, after_space, written / "kept_per_layer.png",
                      title=f"{args.model}: kept fraction per layer")
    curves = {"loss on the step's batch": result.history["loss"]}
    if "baseline" in result.history:
        curves["baseline"] = result.history["baseline"]
    plot_curves(curves, written / "search_loss.png", ylabel=config.loss.upper())
    state_path.unlink(missing_ok=True)

    lines = [
        "",
        f"pruned {args.model}: {params_before:,} -> {params_after:,} parameters "
        f"({100 * (1 - params_after / params_before):.1f}% fewer; prunable q/k/v/o/gate/up/down "
        f"{100 * (1 - after_space.prunable_parameters() / before_space.prunable_parameters()):.1f}% fewer)",
    ]
    if dense_ppl:
        lines.append(f"held-out perplexity: dense {dense_ppl.ppl:.2f} -> pruned {pruned_ppl.ppl:.2f} "
                     f"({pruned_ppl.n_windows} windows x {pruned_ppl.seq_len} tokens of {pruned_ppl.source}; "
                     f"{config.preset} search, refit {args.refit})")
        if baseline:
            lines.append(f"same budget, same refit, same windows: {baseline['method']} {baseline['ppl']:.2f} "
                         f"({'the search is better' if pruned_ppl.ppl < baseline['ppl'] else 'the baseline is better'}"
                         f"; --baseline none skips this)")
    errors = refit_report.mean_errors()
    if errors:
        lines.append("refit (" + args.refit + ", relative calibration error before -> after): " + ", ".join(
            f"{name} {before:.3f} -> {after:.3f}" for name, (before, after) in errors.items()))
    lines += [
        format_accounting(report["accounting"]) if report["cost_budget"] else layer_table(before_space, after_space),
        f"search: {config.steps} steps x {config.samples_per_step} samples in {result.seconds:.0f} s"
        + (f" (resumed at step {saved.step}; seconds of both runs)" if saved else "")
        + f"; wall time of this run {time.perf_counter() - t0:.0f} s",
        f"written to {written} (load with pg_pruning_plugin.load_pruned; plots kept_per_layer.png, search_loss.png)",
    ]
    print("\n".join(lines))
    distributed.barrier("the end of rank 0's evaluation and saving")
    return 0


def _baseline_ppl(model, calib, args: argparse.Namespace, sparsity: float, held_out_ppl) -> dict:
    """Held-out perplexity of ``args.baseline`` at ``sparsity`` (prunable parameters removed) with the same refit
    on the same calibration blocks (None on ranks other than 0, which select and refit but do not evaluate).
    The refit changes only the projections' weights and biases: they are kept aside, ``model`` is refitted,
    measured under the masks, and put back."""
    start = time.perf_counter()
    masks = baseline_masks(model, args.baseline, sparsity, batches=list(calib.split(args.batch_size)),
                           seed=args.seed).masks
    kept_aside = [(p.linear, p.linear.weight.detach().clone(), p.linear.bias) for p in projections(model)]
    config_biases = {k: getattr(model.config, k) for k in ("attention_bias", "mlp_bias") if hasattr(model.config, k)}
    try:
        refit(model, masks, calib, args.refit, damping=args.refit_damping, batch_size=args.batch_size)
        if not distributed.is_main():
            return None
        with masked(model, SearchSpace.from_model(model), masks):
            ppl = held_out_ppl()
    finally:
        with torch.no_grad():
            for linear, weight, bias in kept_aside:
                linear.weight.copy_(weight)
                linear.bias = bias
        for key, value in config_biases.items():
            setattr(model.config, key, value)
    return {"method": args.baseline, "refit": args.refit, "ppl": ppl.ppl, "seconds": time.perf_counter() - start}


def _saved_state(args: argparse.Namespace, state_path: Path) -> SavedState | None:
    """The search state ``--resume`` continues (None without it), after the checks that need no model."""
    if state_path.exists() and not args.resume:
        raise FileExistsError(f"search state {state_path} exists; pass --resume to continue it or delete it")
    if args.resume and not state_path.exists():
        raise FileNotFoundError(f"--resume given but {state_path} does not exist")
    return read_state(state_path) if args.resume else None  # ResumeError: a corrupt file


def interrupted(args: argparse.Namespace, argv: list[str]) -> str:
    """The line printed on Ctrl-C: which step's search state is saved, and the command that resumes it."""
    try:
        step = read_state(_state_path(args)).step
    except ResumeError:
        return (f"interrupted before the search saved a state (every --checkpoint-every {args.checkpoint_every} "
                f"steps); run the same command to start again")
    command = shlex.join(["pg-prune", *argv, *([] if args.resume else ["--resume"])])
    steps = args.steps if args.steps is not None else PRESETS[args.preset]["steps"]
    return (f"interrupted; the search state after step {step} of {steps} is in {_state_path(args)}. "
            f"Resume with: {command}")
