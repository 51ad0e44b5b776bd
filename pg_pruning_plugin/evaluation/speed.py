"""Speed and memory measurements of the search and of pruned models (``pg-prune bench``), and the
memory probe every measurement of the project uses.

Every comparison is measured side by side in one process: the variants of one table are timed
round-robin, ``repeats`` times each after a warm-up, and the median is kept, so a load change on a
shared machine hits all of them alike. GPU timings synchronise before reading the clock.

* :func:`search_speed`: a dense forward of a ``[B, T]`` batch against the same batch through
  sampled sub-networks (masked-multiply and gather execution), the all-ones masked forward, and
  whole search steps (:class:`~pg_pruning_plugin.search.loop.PolicyGradientSearch`).
* :func:`search_memory`: peak memory of plain inference against a search step, each workload in a
  fresh child process on the CPU.
* :func:`search_scaling`: seconds per search step with 1, 2, ... CPU processes (one ``gloo`` group,
  one thread each; core/distributed.py), the world sizes measured in alternating rounds.
* :func:`inference_speed`: prefill and decode tokens/s with ``generate`` of models physically
  pruned by :func:`~pg_pruning_plugin.core.removal.prune_model`, against the dense model.
* :func:`measured`: seconds and peak memory of one call (the one memory probe: GPU
  ``torch.cuda.max_memory_allocated``; CPU the kernel's peak RSS mark, VmHWM, reset before the call).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import json
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..core import distributed
from ..core.architectures import SearchSpace, count_parameters
from ..core.masking import masked
from ..core.modeling import model_device
from ..core.removal import prune_model
from ..core.selection import top_k_mask
from ..core.subnetwork import subnetwork
from ..core.units import UnitMasks, UnitValues
from ..search.config import SearchConfig
from ..search.loop import PolicyGradientSearch, sample_losses

__all__ = ["SHAPES", "bernoulli_masks", "build_model", "inference_speed", "measured", "search_memory", "search_scaling",
           "search_speed", "timed", "uniform_masks"]

logger = logging.getLogger(__name__)

# Real model shapes for random-weight runs (speed does not depend on the weights' values).
SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                         tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=100000.0),
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=4096),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192, rope_theta=500000.0),
}


def build_model(model: str | None, shape: str | dict | None, device: str,
                dtype: torch.dtype) -> tuple[nn.Module, str]:
    """``(model, description)``: random weights of ``shape`` (a :data:`SHAPES` name or its dict of
    config fields) if given, else :func:`models.load_model` of ``model``."""
    if shape is not None:
        if isinstance(shape, str) and shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
        params = dict(SHAPES[shape] if isinstance(shape, str) else shape)
        config = AutoConfig.for_model(params.pop("model_type"), **params)
        torch.manual_seed(0)
        with torch.device(device):
            net = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        return net.eval(), f"{shape if isinstance(shape, str) else 'custom'} shape, random weights"
    from ..resources.models import load_model

    net, _ = load_model(model, dtype=dtype, device=device)
    return net, f"{model or 'smollm2-135m'} (real weights)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
          warmup: int = 1) -> dict[str, float]:
    """Median seconds of each callable, run round-robin ``repeats`` times after ``warmup`` rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bernoulli_masks(space: SearchSpace, keep: float, num_samples: int, seed: int) -> UnitMasks:
    """``num_samples`` random masks keeping every KV group and MLP channel with probability ``keep``."""
    g = torch.Generator().manual_seed(seed)
    return UnitMasks((torch.rand(num_samples, space.num_attn_units, generator=g) < keep).float(),
                     (torch.rand(num_samples, space.num_mlp_units, generator=g) < keep).float())


def _constant_search(model: nn.Module, batch: dict[str, torch.Tensor], steps: int, keep: float,
                     samples: int, execution: str) -> PolicyGradientSearch:
    """A search whose every unit starts at keep-probability ``keep``, over copies of ``batch``."""
    start = UnitValues.full(SearchSpace.from_model(model), keep)
    config = SearchConfig(preset="authors", sparsity=1 - keep, steps=steps, samples_per_step=samples,
                          batch_size=len(batch["input_ids"]), execution=execution)
    return PolicyGradientSearch(model, [batch] * steps, config, init_scores=start)


def _step_seconds(model: nn.Module, batch: dict[str, torch.Tensor], steps: int, keep: float, samples: int,
                  execution: str) -> float:
    """Median wall time of one search step (sampling, K losses, estimator, projection)."""
    stamps: list[float] = []
    search = _constant_search(model, batch, steps + 1, keep, samples, execution)
    search.run(progress=False, on_step=lambda step, state: stamps.append(time.perf_counter()))
    return statistics.median(b - a for a, b in zip(stamps[:-1], stamps[1:]))  # the first step is warm-up


@torch.no_grad()
def search_speed(model: nn.Module, batch_size: int = 8, seq_len: int = 128, samples: int = 2, keep: float = 0.5,
                 repeats: int = 5, search_steps: int = 4) -> dict:
    """Seconds per forward of the same ``[B, T]`` batch: dense, masked, gathered; and per search step."""
    device = model_device(model)
    space = SearchSpace.from_model(model)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    batch = {"input_ids": ids}
    ones = UnitMasks.ones(space)
    sampled = bernoulli_masks(space, keep, samples, seed=1)

    def forward_under(context, masks):
        def fn():
            with context(model, space, masks):
                model(input_ids=ids, use_cache=False)
        return fn

    forwards = timed({
        "dense forward": lambda: model(input_ids=ids, use_cache=False),
        "masked forward, all-ones mask": forward_under(masked, ones),
        "gathered forward, all-ones mask": forward_under(subnetwork, ones),
        f"{samples} sample losses, masked, one [{samples}B, T] forward":
            lambda: sample_losses(model, space, batch, sampled, one_forward=True),
        f"{samples} sample losses, masked, one forward each":
            lambda: sample_losses(model, space, batch, sampled, one_forward=False),
        f"{samples} sample losses, gathered, one forward each":
            lambda: sample_losses(model, space, batch, sampled, execution="gather"),
    }, device, repeats)
    steps = {f"search step ({samples} samples), {execution}": _step_seconds(model, batch, search_steps, keep,
                                                                           samples, execution)
             for execution in ("mask", "gather")}
    kept = float(sampled.mlp.mean()), float(sampled.attn.mean())
    return {"batch_size": batch_size, "seq_len": seq_len, "samples": samples, "keep": keep,
            "sampled_kept_mlp": kept[0], "sampled_kept_attn": kept[1],
            "seconds": forwards | steps}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:"))


def _release_freed_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: freed heap memory stays mapped
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _cpu_peak(fn: Callable[[], object]) -> tuple[object, int, int]:
    """``(result, RSS at the start, peak RSS)`` of ``fn()`` in KiB: freed heap memory is returned to the OS,
    then the kernel's peak-RSS mark (VmHWM) is reset to the current RSS (Linux ``/proc/self/clear_refs``)."""
    _release_freed_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = _status_kib("VmRSS")
    result = fn()
    return result, start, _status_kib("VmHWM")


def measured(fn: Callable[[], object], device: torch.device) -> tuple[object, float, float]:
    """``(result, seconds, peak MiB above the start)`` of ``fn()``.

    GPU: ``torch.cuda.max_memory_allocated`` minus the memory allocated at the start. CPU: the peak
    resident set size during the call minus the one at its start (:func:`_cpu_peak`).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize(device)
        return result, time.perf_counter() - start, (torch.cuda.max_memory_allocated(device) - base) / 2**20
    start = time.perf_counter()
    result, base_kib, peak_kib = _cpu_peak(fn)
    return result, time.perf_counter() - start, (peak_kib - base_kib) / 1024


def _cpu_probe() -> None:
    """Child-process body (spec as JSON in argv[1]): build the model, run one workload under
    :func:`_cpu_peak`, print the peak and post-load RSS in KiB as JSON."""
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    model, _ = build_model(spec["model"], spec["shape"], "cpu", getattr(torch, spec["dtype"]))
    _, loaded, peak = _cpu_peak(lambda: _run_workload(model, spec["workload"], spec["batch_size"], spec["seq_len"],
                                                      spec["samples"], spec["keep"]))
    print(json.dumps({"peak_kib": peak, "loaded_kib": loaded}))


@torch.no_grad()
def _run_workload(model: nn.Module, workload: str, batch_size: int, seq_len: int, samples: int, keep: float) -> None:
    device = model_device(model)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    if workload == "inference":
        model(input_ids=ids, use_cache=False)
    else:
        _constant_search(model, {"input_ids": ids}, 1, keep, samples, workload).run(progress=False)


WORKLOADS = ("inference", "mask", "gather")  # plain forward; one search step per execution


def search_memory(model: nn.Module, model_name: str | None, shape: str | dict | None, batch_size: int = 8,
                  seq_len: int = 128, samples: int = 2, keep: float = 0.5) -> dict:
    """Peak memory (MiB) of plain inference and of one search step per execution mode.

    GPU: ``max_memory_allocated`` in this process (weights included). CPU: peak RSS (VmHWM, reset
    after loading) of a fresh child process per workload; it includes the interpreter, libraries
    and weights, and the RSS right after loading is reported beside it.
    """
    device = model_device(model)
    out: dict[str, dict] = {}
    if device.type == "cuda":
        for workload in WORKLOADS:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            _run_workload(model, workload, batch_size, seq_len, samples, keep)
            out[workload] = {"peak_mib": torch.cuda.max_memory_allocated(device) / 2**20}
        return {"method": "torch.cuda.max_memory_allocated", "peak": out}
    spec = {"model": model_name, "shape": SHAPES.get(shape, shape) if isinstance(shape, str) else shape,
            "dtype": str(next(model.parameters()).dtype).split(".")[-1], "threads": torch.get_num_threads(),
            "batch_size": batch_size, "seq_len": seq_len, "samples": samples, "keep": keep}
    for workload in WORKLOADS:
        child = subprocess.run(
            [sys.executable, "-c", f"from {__name__} import _cpu_probe; _cpu_probe()",
             json.dumps(spec | {"workload": workload})],
            capture_output=True, text=True, check=False,
        )
        if child.returncode:
            raise RuntimeError(f"memory probe for {workload} failed:\n{child.stderr[-2000:]}")
        r = json.loads(child.stdout.strip().splitlines()[-1])
        out[workload] = {"peak_mib": r["peak_kib"] / 1024, "after_load_mib": r["loaded_kib"] / 1024}
    return {"method": "peak RSS (VmHWM reset after loading) of a fresh child process per workload", "peak": out}


def _scaling_rank(spec: dict) -> dict:
    """One rank of :func:`search_scaling`: build the model, run ``steps + 1`` search steps (the first is warm-up),
    return the wall and CPU seconds of the others and how the steps were split."""
    model, _ = build_model(spec["model"], spec["shape"], "cpu", getattr(torch, spec["dtype"]))
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (spec["batch_size"], spec["seq_len"]), generator=torch.Generator().manual_seed(0))
    search = _constant_search(model, {"input_ids": ids}, spec["steps"] + 1, spec["keep"], spec["samples"],
                              spec["execution"])
    stamps: list[tuple[float, float]] = []  # (wall, this process's CPU) seconds after each step

    def stamp(step, state) -> None:
        stamps.append((time.perf_counter(), time.process_time()))

    with torch.no_grad():
        search.run(progress=False, on_step=stamp)
    return {"seconds": stamps[-1][0] - stamps[0][0], "cpu_seconds": stamps[-1][1] - stamps[0][1],
            "split": search.split.as_dict()}


def search_scaling(model_name: str | None, shape: str | dict | None, dtype: torch.dtype, processes: list[int],
                   batch_size: int = 8, seq_len: int = 128, samples: int = 2, keep: float = 0.5, steps: int = 3,
                   rounds: int = 3, execution: str = "gather") -> dict:
    """Seconds per search step on the CPU with each number of ``processes`` (one thread each).

    Every round runs each world size once, in turn, in fresh processes (core/distributed.py's
    ``launch_local``): each rank builds the model, takes one warm-up step and times ``steps`` more. The
    median over ``rounds`` is kept; ``speedup`` is the one-process time over each world size's.
    ``cpu_seconds_per_step`` is the CPU time of the busiest rank: when it falls with the world size but
    the wall time does not, the ranks were waiting for cores (a machine busy with other work).
    """
    spec = {"model": model_name, "shape": SHAPES.get(shape, shape) if isinstance(shape, str) else shape,
            "dtype": str(dtype).split(".")[-1], "batch_size": batch_size, "seq_len": seq_len, "samples": samples,
            "keep": keep, "steps": steps, "execution": execution}
    seconds: dict[int, list[float]] = {w: [] for w in processes}
    cpu: dict[int, list[float]] = {w: [] for w in processes}
    splits: dict[int, dict] = {}
    for _ in range(rounds):
        for world in processes:
            ranks = distributed.launch_local(_scaling_rank, world, spec)
            seconds[world].append(ranks[0]["seconds"] / steps)
            cpu[world].append(max(r["cpu_seconds"] for r in ranks) / steps)
            splits[world] = ranks[0]["split"]
    per_step = {w: statistics.median(s) for w, s in seconds.items()}
    base = per_step.get(1)
    return {"steps": steps, "rounds": rounds, "execution": execution, "threads_per_process": 1,
            "seconds_per_step": {str(w): s for w, s in per_step.items()},
            "cpu_seconds_per_step": {str(w): statistics.median(s) for w, s in cpu.items()},
            "all_rounds": {str(w): s for w, s in seconds.items()},
            "speedup": {str(w): base / s for w, s in per_step.items()} if base else {},
            "split": {str(w): splits[w] for w in processes}}


def uniform_masks(space: SearchSpace, sparsity: float, round_to: int | None, seed: int = 0) -> UnitValues:
    """Random per-layer-uniform hard masks removing ``sparsity`` of each layer's units."""
    g = torch.Generator().manual_seed(seed)
    keep = 1 - sparsity
    return UnitValues(
        top_k_mask(torch.rand(space.num_attn_units, generator=g), keep, space.attn_offsets, global_pool=False),
        top_k_mask(torch.rand(space.num_mlp_units, generator=g), keep, space.mlp_offsets, global_pool=False,
                   min_keep=round_to or 1, round_to=round_to),
    )


@torch.no_grad()
def _generation_times(model: nn.Module, batch_sizes: list[int], prompt_len: int, new_tokens: int,
                      repeats: int) -> dict[int, tuple[float, float]]:
    """``{B: (prefill s, decode s per step)}`` from ``generate`` with 1 and ``new_tokens`` tokens."""
    device = model_device(model)
    vocab = model.config.get_text_config().vocab_size
    out = {}
    for b in batch_sizes:
        prompt = torch.randint(0, vocab, (b, prompt_len), generator=torch.Generator().manual_seed(b)).to(device)

        def gen(n: int, prompt=prompt):
            return lambda: model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                          max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

        t = timed({"one": gen(1), "many": gen(new_tokens)}, device, repeats)
        decode = (t["many"] - t["one"]) / (new_tokens - 1)
        if decode <= 0:  # timing noise larger than the decode time itself: no measurement
            logger.warning("batch %d: decode time lost in timing noise; raise --repeats or new tokens", b)
            decode = float("nan")
        out[b] = (t["one"], decode)
    return out


def inference_speed(model: nn.Module, sparsities: list[float], batch_sizes: list[int], prompt_len: int = 128,
                    new_tokens: int = 32, repeats: int = 3, round_to: int | None = 64) -> Iterator[list[dict]]:
    """Prefill and decode tokens/s of the dense model, then of a copy pruned to each sparsity.

    Yields one list of rows (one per batch size) per model, dense first.
    """
    space = SearchSpace.from_model(model)
    for sparsity in [0.0, *sparsities]:
        net = model if sparsity == 0 else prune_model(copy.deepcopy(model), uniform_masks(space, sparsity, round_to))
        pruned_space = SearchSpace.from_model(net)
        times = _generation_times(net, batch_sizes, prompt_len, new_tokens, repeats)
        yield [{"sparsity": sparsity, "batch_size": b, "params": count_parameters(net),
                "kv_groups": pruned_space.layers[0].num_kv_groups,
                "mlp_channels": pruned_space.layers[0].intermediate_size,
                "prefill_tok_s": b * prompt_len / prefill, "decode_tok_s": b / decode}
               for b, (prefill, decode) in times.items()]
        if net is not model:
            del net
            if next(model.parameters()).device.type == "cuda":
                torch.cuda.empty_cache()
