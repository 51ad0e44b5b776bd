"""Estimated time per step and memory per rank of distributed searches on 8B and 70B shapes (docs/distributed.md).

    python bench/distributed_estimates.py docs/results/speed/cuda-llama-3-8b-search-memory.json \\
        --out docs/results/distributed_estimates.md

Nothing here is measured: every figure is computed from one measured single-GPU ``pg-prune bench`` run
(the JSON file given, Llama-3-8B shape, bf16, batch B x T, K = 2) and from the shapes themselves (built on
the meta device, so no weight is allocated). The rules, stated in the report:

* a rank that scores ``c`` candidates on ``1/d`` of the batch takes ``c · f / d + s``, with ``f`` the
  measured time of one candidate's loss on the whole batch and ``s`` the measured rest of a step (mask
  sampling, estimator, projection, which every rank repeats); ``/d`` is optimistic, since a smaller batch
  uses a GPU less well;
* a 70B-shape forward takes the 8B one times the ratio of their matmul FLOPs per token (prunable
  projections and the LM head), ``s`` scales with the number of searched units;
* memory per rank is the weights (bf16) plus the measured excess of a search step over the weights, and
  for the allocation policy the level table (search/levels.py: the output weights of every level in the
  band, kept on every rank).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from _common import command_line, machine_lines
from transformers import AutoConfig, AutoModelForCausalLM

from pg_pruning_plugin.core.architectures import SearchSpace
from pg_pruning_plugin.evaluation.speed import SHAPES
from pg_pruning_plugin.resources.files import write_atomic
from pg_pruning_plugin.search.levels import channels_of, level_counts, reference_levels

LLAMA_3_70B = dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                   num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)
MIB = 2**20


def shape_facts(shape: dict, sparsity: float = 0.3, block: int = 64, band: int = 8) -> dict:
    """Parameters, bf16 weight MiB, matmul GFLOP per token, searched units, and the allocation policy's level
    table (bf16 MiB with ``loop_refit="lstsq"``) at ``sparsity`` for a config dict."""
    params = dict(shape)
    config = AutoConfig.for_model(params.pop("model_type"), **params)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    space = SearchSpace.from_model(model)
    total = sum(p.numel() for p in model.parameters())
    head = config.vocab_size * config.hidden_size
    reference = reference_levels(space, block, (1 - sparsity) * space.prunable_parameters())
    top = level_counts(space, block)
    table = 0
    for i, s in enumerate(space.layers):
        table += sum(level * s.queries_per_group * s.head_dim for level in range(1, s.num_kv_groups))
        ref = int(reference[i, 1])
        table += sum(k for level in range(max(1, ref - band), min(int(top[i, 1]), ref + band) + 1)
                     if (k := channels_of(level, block, s.intermediate_size)) < s.intermediate_size)
    return {"params": total, "weights_mib": 2 * total / MIB, "gflop_per_token": 2 * (space.prunable_parameters() + head)
            / 1e9, "units": space.num_attn_units + space.num_mlp_units,
            "level_table_mib": 2 * table * space.hidden_size / MIB}


def step_ms(f: float, s: float, candidates: int, ranks: int) -> float:
    """Estimated milliseconds per step: ``candidates`` over ``ranks`` (core.distributed.StepSplit's grid)."""
    groups = math.gcd(candidates, ranks)
    return math.ceil(candidates / groups) * f / (ranks // groups) + s


def estimates(bench: dict) -> dict:
    seconds, peak = bench["search"]["seconds"], bench["memory"]["peak"]
    k = bench["search"]["samples"]
    f_mask = 1000 * seconds[f"{k} sample losses, masked, one forward each"] / k
    f_gather = 1000 * seconds[f"{k} sample losses, gathered, one forward each"] / k
    rest = 1000 * (seconds[f"search step ({k} samples), mask"] - seconds[f"{k} sample losses, masked, one [{k}B, T] "
                                                                        f"forward"])
    small, large = shape_facts(SHAPES["llama-3-8b"]), shape_facts(LLAMA_3_70B)
    excess = {"K in one forward": peak["mask"]["peak_mib"] - small["weights_mib"],
              "one sample at a time": peak["gather"]["peak_mib"] - small["weights_mib"]}
    flops, units = large["gflop_per_token"] / small["gflop_per_token"], large["units"] / small["units"]
    return {"measured": {"one masked sample (ms)": f_mask, "one gathered sample (ms)": f_gather,
                         "rest of a step (ms)": rest, "step, K in one forward (ms)": 1000 * seconds[
                             f"search step ({k} samples), mask"], "excess over weights (MiB)": excess},
            "shapes": {"8B": small, "70B": large}, "ratios": {"flops": flops, "units": units},
            "8B": {"f_mask": f_mask, "f_gather": f_gather, "rest": rest},
            "70B": {"f_mask": f_mask * flops, "f_gather": f_gather * flops, "rest": rest * units}}


def render(bench: dict, source: str, argv: list[str] | None) -> str:
    e = estimates(bench)
    m, sh = e["measured"], e["shapes"]
    lines = ["# Distributed search: estimated time per step and memory per rank", "",
             f"Command: `{command_line(argv)}`  ", f"Measured input: `{source}` ({bench['model']}, {bench['dtype']}, "
             f"batch {bench['search']['batch_size']} x {bench['search']['seq_len']}, K = {bench['search']['samples']}; "
             f"`{bench['command']}`, {bench['date']})  ", *machine_lines(bench["machine"]), "",
             "**Estimates, not measurements** (bench/distributed_estimates.py states the rules). No GPU was available "
             "when they were computed, so no multi-GPU run checks them.", "",
             "| measured on one GPU (8B shape) | value |", "|---|---:|",
             f"| one candidate's loss, masked execution | {m['one masked sample (ms)']:.1f} ms |",
             f"| one candidate's loss, gather execution | {m['one gathered sample (ms)']:.1f} ms |",
             f"| rest of a step (sampling, estimator, projection) | {m['rest of a step (ms)']:.1f} ms |",
             f"| units-policy step, K = 2 in one forward | {m['step, K in one forward (ms)']:.1f} ms |",
             *(f"| step memory above the weights, {what} | {mib:,.0f} MiB |"
               for what, mib in m["excess over weights (MiB)"].items()), "",
             "| shape | parameters | bf16 weights | matmul GFLOP/token | searched units | level table (lstsq, 30 %) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, s in sh.items():
        lines.append(f"| {name} | {s['params'] / 1e9:.2f}B | {s['weights_mib'] / 1024:,.1f} GiB | "
                     f"{s['gflop_per_token']:.1f} | {s['units']:,} | {s['level_table_mib'] / 1024:,.1f} GiB |")
    lines += ["", f"70B from 8B: forward x {e['ratios']['flops']:.2f} (FLOPs per token), rest of a step x "
              f"{e['ratios']['units']:.2f} (searched units).", "",
              "| shape | ranks (GPUs per rank) | policy, candidates per step | split (groups x shards) | "
              "ms per step | candidates per second |", "|---|---|---|---|---:|---:|"]
    # (shape, ranks, GPUs per rank, policy, candidates per step); K = 2 in one forward on one rank is measured
    plans = [("8B", 1, 1, "units", 2), ("8B", 1, 1, "allocation", 5), ("8B", 2, 1, "units", 2),
             ("8B", 2, 1, "allocation", 4), ("8B", 8, 1, "units", 2), ("8B", 8, 1, "units", 8),
             ("8B", 8, 1, "allocation", 8), ("70B", 1, 2, "units", 2), ("70B", 1, 2, "allocation", 5),
             ("70B", 2, 2, "units", 2), ("70B", 4, 2, "units", 2), ("70B", 4, 2, "units", 4),
             ("70B", 4, 2, "allocation", 4)]
    for name, ranks, gpus, policy, candidates in plans:
        x = e[name]
        if policy == "units" and ranks == 1:  # the K samples in one [K·B, T] forward, as measured
            ms = m["step, K in one forward (ms)"] - m["rest of a step (ms)"]
            ms = ms * (e["ratios"]["flops"] if name == "70B" else 1) + x["rest"]
        else:
            ms = step_ms(x["f_mask" if policy == "units" else "f_gather"], x["rest"], candidates, ranks)
        label = f"units, K = {candidates}" if policy == "units" else f"allocation, K = {candidates - 1} (+1)"
        groups = math.gcd(candidates, ranks)
        lines.append(f"| {name} | {ranks} ({gpus}) | {label} | {groups} x {ranks // groups} | {ms:,.0f} | "
                     f"{1000 * candidates / ms:,.1f} |")
    lines += ["", "| shape | GPUs per rank | units policy, one sample per rank: per rank (per GPU) | allocation "
              "policy, loop_refit=lstsq: per rank (per GPU) |", "|---|---:|---:|---:|"]
    one = m["excess over weights (MiB)"]["one sample at a time"]
    for (name, s), gpus in zip(sh.items(), (1, 2)):
        extra = one * (2 if name == "70B" else 1)  # the 8B's excess, doubled for the 70B's wider activations
        units, allocation = (s["weights_mib"] + extra) / 1024, (s["weights_mib"] + extra + s["level_table_mib"]) / 1024
        lines.append(f"| {name} | {gpus} | {units:,.1f} GiB ({units / gpus:,.1f}) | {allocation:,.1f} GiB "
                     f"({allocation / gpus:,.1f}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bench_json", type=Path, help="a single-GPU `pg-prune bench` JSON with search and memory parts")
    p.add_argument("--out", type=Path, required=True, help="markdown report")
    args = p.parse_args(argv)
    write_atomic(args.out, render(json.loads(args.bench_json.read_text()), args.bench_json.as_posix(), argv))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
