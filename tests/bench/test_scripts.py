"""Every bench/ script runs to its report on a tiny model with the real tokenizer (smoke tests, seconds each)."""

from __future__ import annotations

import json
from pathlib import Path

import depth_budget
import estimators
import llmcompressor_quant
import pytest
import quality_report
import search_vs_init
import speed_report

from pg_pruning_plugin.cli import main as pg_prune
from pg_pruning_plugin.evaluation import speed
from tests.helpers import save_tiny


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory) -> Path:
    """A tiny Llama with the SmolLM2 vocabulary that allows 2048-token windows."""
    path = tmp_path_factory.mktemp("bench") / "tiny"
    save_tiny(path, tok, max_position_embeddings=2048)
    return path


def test_depth_budget(model_dir, tmp_path):
    out = tmp_path / "depth.md"
    argv = ["--model", str(model_dir), "--sparsity", "0.3", "--steps", "2", "--batch-size", "2", "--init-batches", "1",
            "--windows-128", "2", "--windows-2048", "1", "--out", str(out)]
    depth_budget.main(argv)
    record = json.loads(out.with_suffix(".json").read_text())
    assert len(record["rows"]) == 1 + 4 + 2 and "ShortGPT" in record["rows"][-1]["method"]
    assert "| 30% | depth (blocks), parameter budget |" in out.read_text()
    depth_budget.main([*argv, "--resume"])  # nothing left to measure
    assert len(json.loads(out.with_suffix(".json").read_text())["rows"]) == 7
    depth_budget.main(["--out", str(out), "--render-only"])
    assert "Machine:" in out.read_text()


def test_search_vs_init(model_dir, tmp_path):
    out = tmp_path / "svi.md"
    search_vs_init.main(["--model", str(model_dir), "--sparsity", "0.5", "--steps", "2", "--batch-size", "2",
                         "--init-batches", "1", "--eval-windows", "2", "--out", str(out)])
    assert "after search, global top-k" in out.read_text()
    assert len(json.loads(out.with_suffix(".json").read_text())["rows"]) == 1


def test_estimators(model_dir, tmp_path):
    record = tmp_path / "est.json"
    estimators.main(["--model", str(model_dir), "--steps", "2", "--search-steps", "2", "--init-batches", "1",
                     "--eval-windows", "2", "--searches", "authors:2:4", "antithetic:2:4", "--trace-every", "1",
                     "--target-ppl", "1e9", "--json", str(record)])
    rows = json.loads(record.read_text())["rows"]
    assert {r["part"] for r in rows} == {"noise", "search"}
    assert [r["estimator"] for r in rows if r["part"] == "search"] == ["authors", "antithetic"]
    assert all(r["forwards_to_target"]["1000000000.0"] == 2 for r in rows if r["part"] == "search")


def test_llmcompressor_quant(model_dir, tmp_path):
    out = tmp_path / "llmc"
    llmcompressor_quant.main(["--model", str(model_dir), "--steps", "2", "--num-samples", "16", "--eval-windows", "2",
                              "--load-repeats", "1", "--out", str(out)])
    record = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in record["rows"]] == ["dense", "pg30", "pg30-w4a16-g64"]
    assert record["same_pruning_in_both_runs"] and (out / "pg30.log").stat().st_size > 0
    assert "| pg30-w4a16-g64 |" in (out / "results.md").read_text()


def test_quality_report_renders_a_compare_run(model_dir, tmp_path):
    results = tmp_path / "q.json"
    assert pg_prune(["compare", "--model", str(model_dir), "--ratios", "0.5", "--methods", "random", "pg-constant",
                     "--calib-blocks", "4", "--batch-size", "2", "--steps", "2", "--ppl128-windows", "2",
                     "--ppl2048-windows", "1", "--limit", "0", "--results", str(results)]) == 0
    notes = tmp_path / "notes.md"
    notes.write_text("Read by hand.")
    quality_report.main([str(results), "--out", str(tmp_path / "q.md"), "--plot", str(tmp_path / "q.png"),
                         "--notes", str(notes)])
    report = (tmp_path / "q.md").read_text()
    assert "PG search, constant init" in report and "skipped in this run" in report and "Read by hand." in report
    assert (tmp_path / "q.png").stat().st_size > 0


def test_speed_report_renders_bench_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(speed.SHAPES, "tiny", dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, head_dim=16, vocab_size=200, max_position_embeddings=64))
    runs = tmp_path / "runs"
    assert pg_prune(["bench", "--shape", "tiny", "--device", "cpu", "--repeats", "1", "--batch-size", "2",
                     "--seq-len", "8", "--prompt-len", "4", "--new-tokens", "3", "--sparsities", "0.5",
                     "--gen-batch-sizes", "1", "2", "--round-to", "8", "--skip", "memory",
                     "--json", str(runs / "cpu-tiny.json")]) == 0
    (runs / "NOTES.md").write_text("Hand-written analysis.")
    speed_report.main([str(runs), "--out", str(tmp_path / "speed.md")])
    report = (tmp_path / "speed.md").read_text()
    assert report.index("Hand-written analysis.") < report.index("| search step (2 samples), gather |")
    assert "| 50% | 2 |" in report
