"""`pg-prune eval MODEL`: perplexity (per protocol) and zero-shot accuracy of a model."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

NAME = "eval"
HELP = "perplexity and zero-shot accuracy of a model (default, HF dir, .gguf, Hub id or pruned checkpoint)"

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..resources.models import DEFAULT_MODEL
    from ..resources.text import DEFAULT_TEXT

    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                        help=f"model: {DEFAULT_MODEL!r} (the embedded SmolLM2-135M-Instruct), HF directory, .gguf "
                             "file, Hub id, or a pruned checkpoint directory")
    parser.add_argument("--text", default=DEFAULT_TEXT,
                        help="perplexity text source: wiki-vital, wikitext2, c4, or a .txt/.jsonl file "
                             "(its eval split; local files are used whole)")
    parser.add_argument("--seq-len", type=int, nargs="+", default=[128],
                        help="window length(s); 128 = LLM-Pruner protocol, 2048 = SparseGPT/SliceGPT protocol")
    parser.add_argument("--max-windows", type=int, default=None, help="use only the first N windows")
    parser.add_argument("--tasks", nargs="*", default=None,
                        help="zero-shot tasks (e.g. the paper's: boolq piqa hellaswag winogrande arc_easy "
                             "arc_challenge openbookqa; 'paper' or no name for those 7; None: no zero-shot)")
    parser.add_argument("--limit", type=int, default=None, help="first N documents per zero-shot task")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch size (None: perplexity 8 at seq 128, zero-shot 16)")
    parser.add_argument("--dtype", default="auto",
                        help="compute dtype: float32, bfloat16, float16 or auto (float32 on the CPU, bfloat16 on an "
                             "accelerator)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--offline", choices=["auto", "yes", "no"], default="auto",
                        help="use the local lm-eval tasks (auto: when the Hub is unreachable)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")


def load_for_eval(spec: str, dtype: str = "auto", device: str = "cpu"):
    """``(model, tokenizer)``: a pruned checkpoint directory via ``core.checkpoint.load_model_dir``, anything
    else via ``resources.models.load_model``."""
    from ..core.checkpoint import is_pruned_checkpoint, load_model_dir
    from ..resources.models import as_dtype, load_model

    if Path(spec).expanduser().is_dir() and is_pruned_checkpoint(spec):
        return load_model_dir(spec, dtype=as_dtype(dtype, device), device=device)
    return load_model(spec, dtype=dtype, device=device)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.perplexity import perplexity
    from ..evaluation.zero_shot import OFFLINE_CHOICES, PAPER_TASKS, format_zero_shot, zero_shot
    from ..resources.files import write_atomic
    from ..resources.text import check_text_source

    check_text_source(args.text)
    model, tokenizer = load_for_eval(args.model, args.dtype, args.device)
    results: dict = {"model": args.model, "perplexity": []}
    for seq_len in args.seq_len:
        r = perplexity(model, tokenizer, source=args.text, seq_len=seq_len, batch_size=args.batch_size,
                       max_windows=args.max_windows)
        print(r)
        results["perplexity"].append(vars(r))
    if args.tasks is not None:
        tasks = PAPER_TASKS if args.tasks in ([], ["paper"]) else tuple(args.tasks)
        zs = zero_shot(model, tokenizer, tasks=tasks, limit=args.limit, batch_size=args.batch_size or 16,
                       offline=OFFLINE_CHOICES[args.offline])
        print(format_zero_shot(zs))
        results["zero_shot"] = zs
    if args.json is not None:
        write_atomic(args.json, json.dumps(results, indent=2))
    return 0
