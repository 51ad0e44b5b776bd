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
    from ..resources.text import DEFAULT_TEXT
    from ..resources.models import DEFAULT_MODEL

    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                        help=f"model: {DEFAULT_MODEL!r} (default), HF directory, .gguf file, Hub id, "
                             "or a pruned checkpoint directory")
    parser.add_argument("--text", default=DEFAULT_TEXT,
                        help="perplexity text source: wiki-vital, wikitext2, c4, or a .txt/.jsonl file "
                             "(its eval split; local files are used whole)")
    parser.add_argument("--seq-len", type=int, nargs="+", default=[128],
                        help="window length(s); 128 = LLM-Pruner protocol, 2048 = SparseGPT/SliceGPT protocol")
    parser.add_argument("--max-windows", type=int, default=None, help="use only the first N windows")
    parser.add_argument("--tasks", nargs="*", default=None,
                        help="zero-shot tasks (e.g. the paper's: boolq piqa hellaswag winogrande arc_easy "
                             "arc_challenge openbookqa; 'paper' for those 7); default: none")
    parser.add_argument("--limit", type=int, default=None, help="first N documents per zero-shot task")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch size (perplexity default 8 at seq 128; zero-shot default 16)")
    parser.add_argument("--dtype", default="float32", help="compute dtype (default float32)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--offline", choices=["auto", "yes", "no"], default="auto",
                        help="use the local lm-eval tasks (auto: when the Hub is unreachable)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")


def _is_pruned_checkpoint(path: Path) -> bool:
    """True for a directory written by ``checkpoint.save_pruned`` (its config records ``pruned_layers``)."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        return False
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    return bool(cfg.get("pruned_layers") or (cfg.get("text_config") or {}).get("pruned_layers"))


def load_for_eval(spec: str, dtype: str = "float32", device: str = "cpu"):
    """``(model, tokenizer)``: a pruned checkpoint via ``checkpoint.load_pruned``, anything else via ``load_model``."""
    from ..resources.models import as_dtype, load_model

    path = Path(spec).expanduser()
    if path.is_dir() and _is_pruned_checkpoint(path):
        from transformers import AutoTokenizer

        from ..core.checkpoint import load_pruned

        model = load_pruned(path, dtype=as_dtype(dtype)).to(device)
        return model, AutoTokenizer.from_pretrained(path)
    return load_model(spec, dtype=dtype, device=device)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.perplexity import PAPER_TASKS, format_zero_shot, perplexity, zero_shot

    model, tokenizer = load_for_eval(args.model, args.dtype, args.device)
    results: dict = {"model": args.model, "perplexity": []}
    for seq_len in args.seq_len:
        r = perplexity(model, tokenizer, source=args.text, seq_len=seq_len, batch_size=args.batch_size,
                       max_windows=args.max_windows)
        print(r)
        results["perplexity"].append(vars(r))
    if args.tasks is not None:
        tasks = PAPER_TASKS if args.tasks in ([], ["paper"]) else tuple(args.tasks)
        offline = {"auto": None, "yes": True, "no": False}[args.offline]
        zs = zero_shot(model, tokenizer, tasks=tasks, limit=args.limit, batch_size=args.batch_size or 16,
                       offline=offline)
        print(format_zero_shot(zs))
        results["zero_shot"] = zs
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0
