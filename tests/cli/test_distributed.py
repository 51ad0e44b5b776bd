"""`torchrun` in front of `pg-prune`: two CPU ranks (gloo) prune a tiny model to the masks one process finds,
rank 0 alone writes the model and the report (which records the split); commands that run in one process
refuse torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pg_pruning_plugin.cli import main
from pg_pruning_plugin.reporting import REPORT_FILE
from tests.helpers import save_tiny

BIN = Path(sys.executable).parent
TORCHRUN = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", str(BIN / "pg-prune")]


def _torchrun(argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "TORCHELASTIC_ERROR_FILE": str(tmp_path / "elastic-error.json")}
    return subprocess.run([*TORCHRUN, *argv], capture_output=True, text=True, timeout=300, env=env)


def test_torchrun_prune_finds_the_masks_of_one_process(tok, tmp_path):
    model_dir = tmp_path / "tiny"
    save_tiny(model_dir, tok, num_hidden_layers=3)
    argv = ["prune", "--model", str(model_dir), "--steps", "4", "--batch-size", "2", "--init-batches", "2",
            "--eval-windows", "2", "--checkpoint-every", "2"]
    done = _torchrun([*argv, "--output", str(tmp_path / "two")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rank_1 = [line for line in done.stderr.splitlines() if line.startswith("[rank 1]")]
    assert not [line for line in rank_1 if " INFO " in line]  # rank 1 logs warnings only
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank
    try:
        assert main([*argv, "--output", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "two" / REPORT_FILE).read_text())
    # the allocation search scores K = 4 candidates and its current widths (5, prime to 2 ranks): the batch is split
    assert report["distributed"] == {"world_size": 2, "candidates_per_step": 5, "batch_size": 2,
                                          "sample_groups": 1, "data_shards": 2, "candidates_per_rank": [5, 5],
                                          "sequences_per_rank": [1, 1]}
    assert report["refit"]["method"] == "lstsq" and report["evaluation"]["baseline"]["method"] == "wanda-sp"
    alone = json.loads((tmp_path / "one" / REPORT_FILE).read_text())
    # the baseline's statistics are summed over the two ranks' calibration shards: equal up to summation order
    assert alone["evaluation"]["baseline"]["ppl"] == pytest.approx(report["evaluation"]["baseline"]["ppl"], rel=1e-3)
    alone = alone["distributed"]
    assert (alone["world_size"], alone["candidates_per_rank"], alone["sequences_per_rank"]) == (1, [5], [2])
    two, one = (torch.load(tmp_path / d / "search_result.pt", weights_only=True) for d in ("two", "one"))
    for kind in ("attn", "mlp"):
        assert torch.equal(two["masks"][kind], one["masks"][kind]) and torch.equal(two["probs"][kind],
                                                                                   one["probs"][kind])
    assert not (tmp_path / "two.search-state.pt").exists()


def test_a_single_process_command_refuses_torchrun(tmp_path):
    done = _torchrun(["export-gguf", str(tmp_path / "m"), str(tmp_path / "m.gguf")], tmp_path)
    assert done.returncode != 0
    assert "pg-prune export-gguf runs in one process; launch it without torchrun" in done.stderr


def test_torchrun_compare_writes_the_rows_of_one_process(tok, tmp_path):
    model_dir = tmp_path / "tiny"
    save_tiny(model_dir, tok, num_hidden_layers=3)
    argv = ["compare", "--model", str(model_dir), "--ratios", "0.3", "--methods", "wanda-sp", "taylor", "search",
            "--search-configs", "authors", "--steps", "2", "--refit", "none", "lstsq", "--calib-blocks", "16",
            "--calib-seq-len", "32", "--batch-size", "4", "--ppl128-windows", "2", "--ppl2048-windows", "0",
            "--limit", "0"]
    done = _torchrun([*argv, "--results", str(tmp_path / "two.json")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*argv, "--results", str(tmp_path / "one.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    two, one = (json.loads((tmp_path / f"{n}.json").read_text())["rows"] for n in ("two", "one"))
    assert [(r["method"], r["refit"]) for r in two] == [(r["method"], r["refit"]) for r in one]
    for a, b in zip(two, one):
        assert (a["kv_groups"], a["mlp_channels"]) == (b["kv_groups"], b["mlp_channels"]), a["method"]
        assert abs(a["ppl128"] - b["ppl128"]) <= 1e-4 * b["ppl128"], (a["method"], a["refit"])
    masks2, masks1 = (torch.load(tmp_path / f"{n}.masks.pt", weights_only=True) for n in ("two", "one"))
    assert masks2.keys() == masks1.keys()
    for key in masks1:
        for kind in masks1[key]["masks"]:
            assert torch.equal(masks2[key]["masks"][kind], masks1[key]["masks"][kind]), key


def test_bench_times_search_steps_with_one_and_two_processes(tmp_path, monkeypatch):
    from pg_pruning_plugin.evaluation import speed

    monkeypatch.setitem(speed.SHAPES, "tiny", dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, head_dim=16, vocab_size=200, max_position_embeddings=64))
    out = tmp_path / "scaling.json"
    argv = ["bench", "--shape", "tiny", "--device", "cpu", "--batch-size", "2", "--seq-len", "8", "--repeats", "1",
            "--skip", "search", "memory", "inference", "--processes", "1", "2", "--scaling-steps", "2", "--json",
            str(out)]
    assert main(argv) == 0
    scaling = json.loads(out.read_text())["scaling"]
    assert set(scaling["seconds_per_step"]) == {"1", "2"} and all(s > 0 for s in scaling["seconds_per_step"].values())
    assert scaling["speedup"]["1"] == 1.0 and scaling["split"]["2"]["candidates_per_rank"] == [1, 1]
    assert main([*argv[:-2], "--processes", "0", "--json", str(out)]) == 2
