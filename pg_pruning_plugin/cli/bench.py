"""``pg-prune bench``: search throughput, search memory and pruned-model inference speed.

One run measures one model on one device and saves the raw numbers as the JSON file ``--json``
(after every part, so an interrupted run keeps what it measured). ``bench/speed_report.py`` renders
a folder of such files side by side (docs/results/speed.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import torch

from ..evaluation.records import provenance
from ..evaluation.speed import SHAPES, build_model, inference_speed, search_memory, search_scaling, search_speed
from ..resources.files import write_atomic
from ..resources.models import as_dtype

NAME = "bench"
HELP = "measure search throughput and memory, and prefill/decode speed of pruned models; results to a JSON file"

logger = logging.getLogger(__name__)

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model to load (None: the embedded SmolLM2-135M-Instruct, real weights)")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="random weights of a real model's shape instead of --model (speed needs no real weights)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--batch-size", type=int, default=8, help="search batch B (sequences per sample)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--samples", type=int, default=2, help="mask samples per search step, K")
    p.add_argument("--sample-sparsity", type=float, default=0.5, help="fraction of units each sample drops")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per variant (median kept)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's choice)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.3, 0.5], help="pruned models to time")
    p.add_argument("--gen-batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--round-to", type=int, default=64, help="pruned MLP widths rounded to a multiple of N")
    p.add_argument("--skip", nargs="*", default=[], choices=["search", "memory", "inference"],
                   help="parts not to measure")
    p.add_argument("--processes", type=int, nargs="*", default=[],
                   help="CPU only: also time search steps with each number of processes (one gloo group, one thread "
                        "each, alternating rounds), e.g. --processes 1 2")
    p.add_argument("--scaling-steps", type=int, default=3, help="timed search steps per process count and round")
    p.add_argument("--json", type=Path, required=True, help="JSON file for the measurements")


def _check(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no GPU is available")
    if args.dtype not in ("float32", "bfloat16", "float16", "auto"):
        raise ValueError(f"--dtype {args.dtype!r}: choose float32, bfloat16, float16 or auto")
    if not 0 < args.sample_sparsity < 1 or any(not 0 < s < 1 for s in args.sparsities):
        raise ValueError("sparsities must be in (0, 1)")
    if args.samples < 2 or args.repeats < 1 or args.new_tokens < 2:
        raise ValueError("--samples must be >= 2, --repeats >= 1 and --new-tokens >= 2")
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be positive")
    if args.processes and (device.type != "cpu" or min(args.processes) < 1 or args.scaling_steps < 1):
        raise ValueError("--processes times CPU processes (--device cpu) with positive counts and --scaling-steps")
    return device, as_dtype(args.dtype, device)


def run(args: argparse.Namespace) -> int:
    device, dtype = _check(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, description = build_model(args.model, args.shape, str(device), dtype)
    result = {"command": shlex.join(["pg-prune", *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d %H:%M"),
              "device": device.type, "model": description, "dtype": str(dtype).split(".")[-1],
              "machine": provenance(device)}

    def save() -> None:  # after every part, so an interrupted run keeps what it measured
        result["wall_seconds"] = time.perf_counter() - start
        write_atomic(args.json, json.dumps(result, indent=1))

    keep = 1 - args.sample_sparsity
    if "search" not in args.skip:
        logger.info("timing search forwards and steps")
        result["search"] = search_speed(model, args.batch_size, args.seq_len, args.samples, keep, args.repeats)
        save()
    if "memory" not in args.skip:
        logger.info("measuring peak memory")
        result["memory"] = search_memory(model, args.model, args.shape, args.batch_size, args.seq_len,
                                         args.samples, keep)
        save()
    if args.processes:
        logger.info("timing search steps with %s CPU processes", args.processes)
        result["scaling"] = search_scaling(args.model, args.shape, dtype, args.processes, args.batch_size,
                                           args.seq_len, args.samples, keep, args.scaling_steps, args.repeats)
        save()
    if "inference" not in args.skip:
        logger.info("timing generate on dense and pruned models")
        result["inference_setup"] = {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                                     "round_to": args.round_to}
        result["inference"] = []
        for rows in inference_speed(model, args.sparsities, args.gen_batch_sizes, args.prompt_len,
                                    args.new_tokens, args.repeats, args.round_to):
            result["inference"] += rows
            save()
    save()
    print(f"wrote {args.json} (render a report with bench/speed_report.py)")
    return 0
