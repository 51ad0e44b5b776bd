"""``pg-prune prune``: search, prune, evaluate and save, with a short report at the end.

With no arguments it runs the embedded default: SmolLM2-135M-Instruct, 30 % of the KV groups and
30 % of the MLP channels removed, calibrated on the wiki-vital calib split and evaluated on the
held-out eval split.

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

from transformers import AutoConfig

from ..core import distributed
from ..core.architectures import SearchSpace, architecture_of, count_parameters
from ..core.checkpoint import save_pruned
from ..core.removal import kept_space, prune_model
from ..evaluation.perplexity import perplexity
from ..reporting import REPORT_FILE, format_accounting, layer_table, plot_curves, plot_layer_widths, pruning_report
from ..resources.models import DEFAULT_MODEL, load_model, model_paths, resolve_model_dir, weightless_model
from ..resources.outputs import check_output
from ..resources.text import DEFAULT_TEXT, calibration_blocks, check_text_source
from ..scoring.metrics import METRICS
from ..search.budget import GRANULARITIES, Budget
from ..search.config import EXECUTIONS, ResumeError, SearchConfig
from ..search.init import INIT_MAPPINGS
from ..search.loop import PolicyGradientSearch
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
    g.add_argument("--sparsity", type=float, default=0.3, help="fraction of units removed (both types)")
    g.add_argument("--attn-sparsity", type=float, default=None, help="fraction of KV groups removed")
    g.add_argument("--mlp-sparsity", type=float, default=None, help="fraction of MLP channels removed")
    g.add_argument("--uniform", action="store_true", help="same keep rate in every layer (stock HF checkpoint)")
    g.add_argument("--round-to", type=int, default=None, help="kept MLP widths rounded to a multiple of N")
    g.add_argument("--granularity", choices=GRANULARITIES, default="width",
                   help="units: width (KV groups, MLP channels), depth (whole attention/MLP blocks), or both")
    g.add_argument("--cost", choices=("params", "flops"), default=None,
                   help="one budget in this currency instead of separate per-type budgets: --sparsity is then the "
                        "fraction of prunable parameters (or FLOPs/token) removed (depth granularities: params)")
    g.add_argument("--cost-seq-len", type=int, default=2048, help="context length of the FLOPs cost and report")
    g.add_argument("--keep-params", type=_count, default=None,
                   help="total parameters to keep, e.g. 100M or 1.2e8 (one parameter budget instead of --sparsity)")
    s = p.add_argument_group("search (paper defaults except --steps, --lr and --init-mapping, which suit the short "
                             "default run; the paper: --steps 15000 --lr 2e-3 --init-mapping sigmap)")
    s.add_argument("--steps", type=int, default=100, help="optimisation steps (paper: 15000)")
    s.add_argument("--samples", type=int, default=2, help="mask samples per step, K")
    s.add_argument("--lr", type=float, default=1e-2, help="score learning rate (cosine to 0; paper: 2e-3)")
    s.add_argument("--baseline-window", type=int, default=5, help="EMA baseline window W (0: no baseline)")
    s.add_argument("--batch-size", type=int, default=8, help="calibration blocks per step")
    s.add_argument("--seq-len", type=int, default=128, help="tokens per calibration block")
    s.add_argument("--max-epochs", type=int, default=1, help="passes allowed over the calibration blocks")
    s.add_argument("--init", choices=METRICS, default="wanda-sp", help="initial metric")
    s.add_argument("--init-mapping", choices=INIT_MAPPINGS, default="mask",
                   help="metric to initial keep-probabilities (mask: the init mask itself; paper: sigmap; "
                        "see docs/method.md)")
    s.add_argument("--init-batches", type=int, default=4, help="calibration batches for the initial metric")
    s.add_argument("--estimator", choices=ESTIMATORS, default="authors", help="gradient estimator")
    s.add_argument("--execution", choices=EXECUTIONS, default="gather",
                   help="gather: skip the compute of dropped units (faster, same losses); mask: multiply by 0")
    s.add_argument("--seed", type=int, default=42, help="calibration sample, mask sampling and batch order")
    s.add_argument("--checkpoint", default=None,
                   help="search-state file, written every --checkpoint-every steps (None: OUTPUT.search-state.pt)")
    s.add_argument("--checkpoint-every", type=int, default=25, help="steps between search-state snapshots")
    s.add_argument("--resume", action="store_true", help="continue from an existing --checkpoint file")
    e = p.add_argument_group("report")
    e.add_argument("--eval-windows", type=int, default=64,
                   help="held-out 128-token windows for the dense/pruned perplexity (0: skip)")


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
        sparsity=args.sparsity, attn_sparsity=args.attn_sparsity, mlp_sparsity=args.mlp_sparsity,
        global_budget=not args.uniform, steps=args.steps, samples_per_step=args.samples, lr=args.lr,
        baseline_window=args.baseline_window, batch_size=args.batch_size, max_epochs=args.max_epochs,
        init=args.init, init_mapping=args.init_mapping, init_batches=args.init_batches,
        estimator=args.estimator, execution=args.execution, round_to=args.round_to, seed=args.seed,
        checkpoint_every=args.checkpoint_every, granularity=args.granularity, cost=args.cost,
        cost_seq_len=args.cost_seq_len, keep_params=args.keep_params,
    )


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
    steps_per_epoch = math.ceil(config.steps / config.max_epochs)
    if saved is not None:  # ResumeError naming the field that differs from this run
        check_signature(saved, signature(config, before_space, steps_per_epoch), state_path)

    model, tokenizer = load_model(model_dir, device=distributed.local_device())
    calib = calibration_blocks(tokenizer, args.text, args.seq_len, steps_per_epoch * config.batch_size, seed=args.seed)
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
    prune_model(model, result.masks)
    if not distributed.is_main():
        distributed.barrier("the end of rank 0's evaluation and saving")
        return 0
    after_space = kept_space(before_space, result.masks)
    params_after = count_parameters(model)
    pruned_ppl = held_out_ppl()
    evaluation = None if not dense_ppl else {"dense_ppl": dense_ppl.ppl, "pruned_ppl": pruned_ppl.ppl,
                                             "protocol": str(pruned_ppl)}
    run = {"model": args.model, "calibration": args.text, "arguments": vars(args)}
    report = pruning_report(before_space, result.masks, search.budget, result, params=(params_before, params_after),
                            evaluation=evaluation, run=run, distributed=search.split.as_dict())
    written = save_pruned(model, output, tokenizer, overwrite=args.overwrite,
                          extra_files={REPORT_FILE: json.dumps(report, indent=2)})
    result.save(written / "search_result.pt")
    plot_layer_widths(before_space, after_space, written / "kept_per_layer.png",
                      title=f"{args.model}: kept fraction per layer")
    plot_curves({"mean sample loss": result.history["loss"], "baseline": result.history["baseline"]},
                written / "search_loss.png", ylabel="cross-entropy")
    state_path.unlink(missing_ok=True)

    lines = [
        "",
        f"pruned {args.model}: {params_before:,} -> {params_after:,} parameters "
        f"({100 * (1 - params_after / params_before):.1f}% fewer; prunable q/k/v/o/gate/up/down "
        f"{100 * (1 - after_space.prunable_parameters() / before_space.prunable_parameters()):.1f}% fewer)",
    ]
    if dense_ppl:
        lines.append(f"held-out perplexity: dense {dense_ppl.ppl:.2f} -> pruned {pruned_ppl.ppl:.2f} "
                     f"({pruned_ppl.n_windows} windows x {pruned_ppl.seq_len} tokens of {pruned_ppl.source})")
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
    return (f"interrupted; the search state after step {step} of {args.steps} is in {_state_path(args)}. "
            f"Resume with: {command}")
