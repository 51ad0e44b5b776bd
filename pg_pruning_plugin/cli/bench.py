"""``pg-prune bench``: search throughput, search memory and pruned-model inference speed.

One run measures one model on one device and saves the raw numbers as JSON under
``--results-dir``; then ``--out`` (docs/results/speed.md) is re-rendered from every JSON file
there (after the analysis in ``--results-dir``/NOTES.md), so CPU and GPU runs made on different
machines end up side by side in one report.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

from ..evaluation.speed import SHAPES, build_model, inference_speed, search_memory, search_speed
from ..core.checkpoint import write_atomic

NAME = "bench"
HELP = "measure search throughput and memory, and prefill/decode speed of pruned models; write speed.md"

logger = logging.getLogger(__name__)

# Targets of issue #6: (label, measured ratio key, threshold, direction)
TARGETS = (
    ("search step, gather execution, per sample vs dense forward", "step_speedup_gather", 1.4, ">="),
    ("search step, masked execution (K samples in one forward), per sample vs dense forward",
     "step_speedup_mask", 1.4, ">="),
    ("peak search memory vs plain inference memory", "memory_ratio", 1.1, "<="),
    ("decode throughput of a 50%-pruned model vs dense (batch 1)", "decode_speedup_b1", 1.6, ">="),
    ("decode throughput of a 50%-pruned model vs dense (batch 8)", "decode_speedup_b8", 1.6, ">="),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model to load (default: SmolLM2-135M-Instruct, real weights)")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="random weights of a real model's shape instead of --model (speed needs no real weights)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--batch-size", type=int, default=8, help="search batch B (sequences per sample)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--samples", type=int, default=2, help="mask samples per search step, K")
    p.add_argument("--sample-sparsity", type=float, default=0.5, help="fraction of units each sample drops")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per variant (median kept)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.3, 0.5], help="pruned models to time")
    p.add_argument("--gen-batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--round-to", type=int, default=64, help="pruned MLP widths rounded to a multiple of N")
    p.add_argument("--skip", nargs="*", default=[], choices=["search", "memory", "inference"],
                   help="parts not to measure")
    p.add_argument("--results-dir", default="docs/results/speed", help="raw JSON results, one file per run")
    p.add_argument("--out", default="docs/results/speed.md", help="report rendered from every JSON in --results-dir")
    p.add_argument("--render-only", action="store_true", help="only re-render --out from --results-dir")


def _check(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no GPU is available")
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    if dtype_name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype {args.dtype!r}: choose float32, bfloat16, float16 or auto")
    if not 0 < args.sample_sparsity < 1 or any(not 0 < s < 1 for s in args.sparsities):
        raise ValueError("sparsities must be in (0, 1)")
    if args.samples < 2 or args.repeats < 1 or args.new_tokens < 2:
        raise ValueError("--samples must be >= 2, --repeats >= 1 and --new-tokens >= 2")
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be positive")
    return device, getattr(torch, dtype_name)


def _machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg()[0], "python": platform.python_version(), "torch": torch.__version__,
            "transformers": version("transformers"), "torch_pruning": version("torch-pruning")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _summary(result: dict) -> dict:
    """Ratios against the targets, from the raw numbers of one run."""
    out = {}
    if "search" in result:
        s = result["search"]["seconds"]
        k = result["search"]["samples"]
        dense = s["dense forward"]
        out["ones_overhead"] = s["masked forward, all-ones mask"] / dense - 1
        for e in ("mask", "gather"):
            out[f"step_speedup_{e}"] = dense / (s[f"search step ({k} samples), {e}"] / k)
    if "memory" in result:
        peak = result["memory"]["peak"]
        out["memory_ratio"] = min(peak[w]["peak_mib"] for w in ("mask", "gather")) / peak["inference"]["peak_mib"]
    if "inference" in result:
        rows = result["inference"]
        for b in (1, 8):
            dense = [r for r in rows if r["sparsity"] == 0 and r["batch_size"] == b]
            half = [r for r in rows if r["sparsity"] == 0.5 and r["batch_size"] == b]
            if dense and half:
                out[f"decode_speedup_b{b}"] = half[0]["decode_tok_s"] / dense[0]["decode_tok_s"]
    return out


def _render_run(r: dict) -> list[str]:
    m = r["machine"]
    lines = [f"## {r['device']} · {r['model']} · {r['dtype']}", "",
             f"Command: `{r['command']}`  ", f"Date: {r['date']}, {r['wall_seconds']:.0f} s wall  ",
             f"Machine: {m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads, "
             f"1-min load average {m['load_average']:.1f} at the start)" + (f", GPU {m['gpu']}" if "gpu" in m else "")
             + "  ",
             f"Versions: Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
             f"torch-pruning {m['torch_pruning']}", ""]
    if "note" in r:
        lines += [f"Note: {r['note']}", ""]
    summary = _summary(r)
    if "search" in r:
        s = r["search"]
        tokens = s["batch_size"] * s["seq_len"]
        dense = s["seconds"]["dense forward"]
        lines += [f"### Search throughput (batch {s['batch_size']} x {s['seq_len']} tokens, K = {s['samples']}, "
                  f"samples keep {s['sampled_kept_mlp']:.0%} of MLP channels and {s['sampled_kept_attn']:.0%} "
                  f"of KV groups)", "",
                  "| what | seconds | samples x tokens | tokens/s | per-sample speed vs dense forward |",
                  "|---|---:|---:|---:|---:|"]
        for name, sec in s["seconds"].items():
            n = s["samples"] if ("sample" in name and "all-ones" not in name) else 1
            lines.append(f"| {name} | {sec:.4f} | {n} x {tokens} | {n * tokens / sec:,.0f} | "
                         f"{(dense * n) / sec:.2f}x |")
        lines += ["", f"All-ones masked forward overhead vs dense: {summary['ones_overhead']:+.1%} (target within 5%).",
                  ""]
    if "memory" in r:
        mem = r["memory"]
        lines += [f"### Peak memory ({mem['method']})", "", "| workload | peak MiB | vs inference |", "|---|---:|---:|"]
        base = mem["peak"]["inference"]["peak_mib"]
        labels = {"inference": "plain inference forward", "mask": "search step, masked execution",
                  "gather": "search step, gather execution"}
        for w, v in mem["peak"].items():
            extra = f" (after loading: {v['after_load_mib']:.0f})" if "after_load_mib" in v else ""
            lines.append(f"| {labels[w]} | {v['peak_mib']:.0f}{extra} | {v['peak_mib'] / base:.2f}x |")
        lines.append("")
    if "inference" in r:
        rows = r["inference"]
        info = r["inference_setup"]
        lines += [f"### Pruned-model inference (`generate`, prompt {info['prompt_len']} tokens, "
                  f"{info['new_tokens']} new tokens, greedy; per-layer-uniform random masks, MLP widths rounded to "
                  f"{info['round_to']})", "",
                  "| sparsity | batch | params (M) | KV groups / MLP channels per layer | prefill tok/s | vs dense "
                  "| decode tok/s | vs dense |", "|---:|---:|---:|---|---:|---:|---:|---:|"]
        dense = {x["batch_size"]: x for x in rows if x["sparsity"] == 0}
        for x in rows:
            d = dense[x["batch_size"]]
            lines.append(f"| {x['sparsity']:.0%} | {x['batch_size']} | {x['params'] / 1e6:.1f} | "
                         f"{x['kv_groups']} / {x['mlp_channels']} | {x['prefill_tok_s']:,.0f} | "
                         f"{x['prefill_tok_s'] / d['prefill_tok_s']:.2f}x | {x['decode_tok_s']:,.1f} | "
                         f"{x['decode_tok_s'] / d['decode_tok_s']:.2f}x |")
        lines.append("")
    rows = [(label, summary[key], thr, op) for label, key, thr, op in TARGETS if key in summary]
    if rows:
        lines += ["### Targets", "", "| target | measured | met |", "|---|---:|---|"]
        for label, value, thr, op in rows:
            met = value >= thr if op == ">=" else value <= thr
            lines.append(f"| {label} {op} {thr}x | {value:.2f}x | {'yes' if met else 'no'} |")
        lines.append("")
    return lines


def render(results_dir: Path, out: Path) -> None:
    """Write ``out`` from every ``*.json`` run in ``results_dir`` (CPU runs first), after the
    hand-written analysis in ``results_dir/NOTES.md`` if there is one."""
    runs = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    runs.sort(key=lambda r: (r["device"] != "cpu", r["model"]))
    lines = ["# Speed and memory (`pg-prune bench`)", "",
             "Generated by `pg-prune bench` from the JSON files in "
             f"`{results_dir.as_posix()}`; each section is one run, measured side by side in one process.", ""]
    notes = results_dir / "NOTES.md"
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    for r in runs:
        lines += _render_run(r)
    write_atomic(out, "\n".join(lines))


def run(args: argparse.Namespace) -> int:
    if args.render_only:
        render(Path(args.results_dir), Path(args.out))
        return 0
    device, dtype = _check(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, description = build_model(args.model, args.shape, str(device), dtype)
    result = {"command": shlex.join(["pg-prune", *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d %H:%M"),
              "device": device.type, "model": description, "dtype": str(dtype).split(".")[-1],
              "machine": _machine(device)}
    results_dir = Path(args.results_dir)
    parts = "-".join(p for p in ("search", "memory", "inference") if p not in args.skip)
    path = results_dir / f"{device.type}-{args.shape or Path(args.model or 'smollm2-135m').name}-{parts}.json"

    def save() -> None:  # after every part, so an interrupted run keeps what it measured
        result["wall_seconds"] = time.perf_counter() - start
        write_atomic(path, json.dumps(result, indent=1))
        render(results_dir, Path(args.out))

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
    if "inference" not in args.skip:
        logger.info("timing generate on dense and pruned models")
        result["inference_setup"] = {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                                     "round_to": args.round_to}
        result["inference"] = []
        for rows in inference_speed(model, args.sparsities, args.gen_batch_sizes, args.prompt_len,
                                    args.new_tokens, args.repeats, args.round_to):
            result["inference"] += rows
            save()
    logger.info("wrote %s and %s", path, args.out)
    for label, key, thr, op in TARGETS:
        if key in (summary := _summary(result)):
            logger.info("%s: %.2fx (target %s %.1fx)", label, summary[key], op, thr)
    return 0
