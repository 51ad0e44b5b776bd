"""What the multi-process tests run: scenarios computed once by two ``gloo`` ranks (torch.multiprocessing
spawn) and once in the test process, then compared (tests/core/test_distributed.py).

Every scenario is a function ``(tmp: Path) -> dict`` of plain tensors and numbers. It must compute the
same thing whatever the world size: under a process group the package's functions split the work
themselves. The workers run with one thread, as the references do.
"""

from __future__ import annotations

import copy
import os
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from pg_pruning_plugin import PolicyGradientSearch, SearchConfig, SearchSpace
from pg_pruning_plugin.core import distributed
from pg_pruning_plugin.refit import refit
from pg_pruning_plugin.scoring.baselines import flap_statistics, taylor_scores
from pg_pruning_plugin.scoring.metrics import block_influence, compute_metric
from tests.helpers import random_masks, tiny_model

CALIB = torch.randint(0, 200, (48, 16), generator=torch.Generator().manual_seed(7))


def _search(tmp: Path, checkpoint: str | None = None, stop_after: int | None = None, **config) -> dict:
    cfg = SearchConfig(**({"preset": "authors", "steps": 6, "batch_size": 4, "init_batches": 4} | config))
    search = PolicyGradientSearch(tiny_model("llama"), CALIB, cfg,
                                  checkpoint_path=None if checkpoint is None else tmp / checkpoint)

    def stop(step, state):
        if stop_after is not None and state.step == stop_after:
            raise KeyboardInterrupt

    try:
        result = search.run(progress=False, on_step=stop)
    except KeyboardInterrupt:
        return {"stopped": True}
    out = {"probs": result.probs.as_dict(), "masks": result.masks.as_dict(), "history": result.history,
           "split": search.split.as_dict()}
    if result.levels is not None:
        out["levels"] = result.levels
    return out


def _statistics(tmp: Path) -> dict:
    model = tiny_model("llama")
    space = SearchSpace.from_model(model)
    batches = list(CALIB[:24].split(4))  # 6 batches: 3 per rank
    out = {f"metric {m}": compute_metric(model, space, m, batches, keep_ratio=0.7, progress=False).as_dict()
           for m in ("wanda-sp", "wifv")}
    flap = flap_statistics(model, batches, progress=False)
    out["flap"] = {"attn": torch.cat(flap.attn_metric), "mlp": torch.cat(flap.mlp_metric)}
    influence = block_influence(model, space, batches, progress=False)
    out["influence"] = {"attn": influence.attn, "mlp": influence.mlp, "layer": influence.layer}
    out["taylor"] = taylor_scores(model, batches, progress=False).as_dict()
    refitted = copy.deepcopy(model)
    report = refit(refitted, random_masks(space, keep=0.6), CALIB[:24], "lstsq", batch_size=4, progress=False)
    out["refit"] = {"weights": {k: v for k, v in refitted.state_dict().items() if "o_proj" in k or "down_proj" in k},
                    "tokens": report.tokens, "errors": [(p.error_before, p.error_after) for p in report.projections]}
    return out


SCENARIOS: dict[str, Callable[[Path], dict]] = {
    # K = 2 over 2 ranks: one sample each, whole batches (bit-identical to one process)
    "units-samples": lambda tmp: _search(tmp, execution="gather", init="wanda-sp"),
    # K = 3 over 2 ranks: gcd 1, so every batch is split by rows (token-weighted means)
    "units-rows": lambda tmp: _search(tmp, samples_per_step=3, execution="mask"),
    # KL loss with held-in checks: dense targets of each rank's rows, held-in batches split over ranks
    "units-kl-incumbent": lambda tmp: _search(tmp, loss="kl", incumbent_every=2, held_in_blocks=8,
                                              execution="gather", init_mapping="mask"),
    # allocation: K = 3 transfers + the current allocation = 4 candidates, 2 per rank
    "allocation-samples": lambda tmp: _search(tmp, preset="allocation", steps=4, samples_per_step=3,
                                              incumbent_every=2, held_in_blocks=8, block_size=16),
    # allocation: 4 + 1 = 5 candidates, gcd 1: rows split
    "allocation-rows": lambda tmp: _search(tmp, preset="allocation", steps=4, samples_per_step=4,
                                           incumbent_every=2, held_in_blocks=8, block_size=16),
    "statistics": _statistics,
    # a search state written after step 3 of 6 (resumed elsewhere)
    "checkpoint": lambda tmp: _search(tmp, checkpoint="state.pt", checkpoint_every=3, stop_after=3,
                                      execution="gather"),
}


def run_scenarios(tmp: Path) -> dict[str, dict]:
    """Every scenario, in this process (under whatever process group is initialised)."""
    return {name: fn(tmp) for name, fn in SCENARIOS.items()}


def _init(rank: int, world: int, tmp: Path, timeout: float) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp / 'rendezvous'}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout))


def scenario_worker(rank: int, world: int, tmp: str) -> None:
    """Spawned rank: run every scenario; rank 0 saves the results, every rank its mismatch error."""
    tmp = Path(tmp)
    _init(rank, world, tmp, 60)
    try:
        results = run_scenarios(tmp)
        try:  # another seed on rank 1: refused before any work, on every rank
            PolicyGradientSearch(tiny_model("llama"), CALIB, SearchConfig(preset="authors",
                                                                          steps=2, batch_size=4, init_batches=2,
                                                                          seed=42 + rank)).run(progress=False)
            mismatch = None
        except distributed.DistributedError as exc:
            mismatch = str(exc)
        torch.save({"rank": rank, "mismatch": mismatch}, tmp / f"mismatch-{rank}.pt")
        if rank == 0:
            torch.save(results, tmp / "results.pt")
    finally:
        dist.destroy_process_group()


def failing_worker(rank: int, world: int, tmp: str, how: str) -> None:
    """Spawned rank of a search in which rank 1 dies (``how="exit"``) or raises (``"raise"``) at step 2; each
    surviving rank writes the error it ended with, rank 0 the result only if the search finished."""
    tmp = Path(tmp)
    _init(rank, world, tmp, 60)

    def fail(step, state):
        if rank == 1 and state.step == 2:
            if how == "exit":
                os._exit(3)
            raise ValueError("rank 1 raised on purpose")

    try:
        cfg = SearchConfig(preset="authors", steps=8, batch_size=4, init_batches=2, execution="gather")
        result = PolicyGradientSearch(tiny_model("llama"), CALIB, cfg).run(progress=False, on_step=fail)
        torch.save(result.masks.as_dict(), tmp / "result.pt")
    except Exception as exc:
        (tmp / f"error-{rank}.txt").write_text(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        raise SystemExit(1) from exc


def oneshot_worker(rank: int, world: int, tmp: str, model_dir: str) -> None:
    """Spawned rank of an llmcompressor ``oneshot`` with the pruning modifier; writes the error it ended with."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from pg_pruning_plugin.integrations.llmcompressor import PolicyGradientPruningModifier
    from tests.helpers import QUANT_VOCAB

    tmp = Path(tmp)
    _init(rank, world, tmp, 60)
    ids = torch.randint(3, QUANT_VOCAB, (16, 32), generator=torch.Generator().manual_seed(0))
    calib = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    try:
        oneshot(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                processor=PreTrainedTokenizerFast.from_pretrained(model_dir), dataset=calib,
                recipe=PolicyGradientPruningModifier(steps=2, batch_size=4, init_batches=1),
                num_calibration_samples=16, max_seq_length=32)
        (tmp / f"error-{rank}.txt").write_text("none")
    except Exception as exc:  # noqa: BLE001 - the test reads what each rank ended with
        (tmp / f"error-{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
    finally:
        dist.destroy_process_group()
